"""GTA5 -> Cityscapes, DeepLab-v2 VGG-16, full method (the paper's VGG settings).

    python train.py --config=configs/gta_vgg.py --workdir=runs/gta_vgg

Needs: TFDS `gta5/1280x720`, `cityscapes/1024x512`, and a source-only VGG-16 DeepLab as
`init_checkpoint` (our workdir, or a converted reference/torchvision checkpoint:
`python data_prep/convert_torch_checkpoint.py --backbone=vgg16 --input=X.pth --output=...`).
"""

from udajax import configuration


def get_config():
  c = configuration.base_config()
  c.init_checkpoint = "pretrained/gta5_source_vgg16"
  c.model.backbone = "vgg16"
  c.loss.lambda_cl = 1e-1
  c.loss.lambda_or = 2e-2
  c.loss.lambda_sp = 2e-2
  c.loss.lambda_em = 2e-2
  c.loss.iw_ratio = 0.2
  return c
