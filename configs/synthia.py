"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes (16 classes), DeepLab-v2 ResNet-101, full method.

    python train.py --config=configs/synthia.py --workdir=runs/synthia

Needs: TFDS `synthia/1280x760` and `cityscapes/1024x512`, and a source-only model as
`init_checkpoint` (workdir of `configs/synthia_source.py` or a converted PyTorch checkpoint).
Expect (paper, Cityscapes val): 48.2 mIoU over 13 classes (`eval/mIoU13`; 44.2 without EM).
"""

from udajax import configuration


def get_config():
  c = configuration.base_config()
  c.num_classes = 16
  c.init_checkpoint = "pretrained/synthia_source_r101"
  c.source.name = "synthia"
  c.source.builder_config = "1280x760"
  c.source.image_size = (760, 1280)
  c.loss.lambda_cl = 2e-2
  c.loss.lambda_or = 1e-1
  c.loss.lambda_sp = 1.0
  c.loss.lambda_em = 5e-2
  c.loss.iw_ratio = 0.0
  return c
