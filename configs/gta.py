"""GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, L_cl + L_or + L_sp + EM (the paper's full method).

    python train.py --config=configs/gta.py --workdir=runs/gta

Needs: TFDS `gta5/1280x720` and `cityscapes/1024x512` (+ `cityscapes/full` for full-resolution
eval), built with `python data_prep/build_datasets.py gta5|cityscapes --manual_dir=...`; and a
source-only model as `init_checkpoint`: either the workdir of `configs/gta_source.py` or a
converted PyTorch checkpoint (`python data_prep/convert_torch_checkpoint.py --input=X.pth
--output=pretrained/gta5_source_r101`).
Expect (paper, Cityscapes val): 45.9 mIoU (45.3 without EM: --config.loss.lambda_em=0).
~24,750 steps at batch 1 per domain (one source and one target image per step).
"""

from udajax import configuration


def get_config():
  c = configuration.base_config()
  c.init_checkpoint = "pretrained/gta5_source_r101"
  c.loss.lambda_cl = 2e-2
  c.loss.lambda_or = 2.0
  c.loss.lambda_sp = 0.5
  c.loss.lambda_em = 0.1
  c.loss.iw_ratio = 0.2
  return c
