"""SYNTHIA source-only pretraining (16 classes), DeepLab-v2 ResNet-101.

    python train.py --config=configs/synthia_source.py --workdir=runs/synthia_source

Needs: TFDS `synthia/1280x760`, `cityscapes/1024x512`, and the converted ImageNet init
(`pretrained/deeplab_r101_imagenet`, see configs/gta_source.py).
Expect (paper, Cityscapes val): 40.5 mIoU over 13 classes (`eval/mIoU13`).
"""

from configs import synthia
from udajax import configuration


def get_config():
  return configuration.make_source_only(synthia.get_config())
