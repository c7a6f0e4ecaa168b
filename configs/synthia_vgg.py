"""SYNTHIA -> Cityscapes (16 classes), DeepLab-v2 VGG-16, full method (paper's VGG settings).

    python train.py --config=configs/synthia_vgg.py --workdir=runs/synthia_vgg

Needs: TFDS `synthia/1280x760`, `cityscapes/1024x512`, a source-only VGG-16 DeepLab as
`init_checkpoint`. Reports `eval/mIoU` (16 classes) and `eval/mIoU13`.
"""

from configs import synthia


def get_config():
  c = synthia.get_config()
  c.init_checkpoint = "pretrained/synthia_source_vgg16"
  c.model.backbone = "vgg16"
  c.loss.lambda_cl = 5e-2
  c.loss.lambda_or = 5e-2
  c.loss.lambda_sp = 2e-2
  c.loss.lambda_em = 1e-2
  c.loss.iw_ratio = 0.2
  return c
