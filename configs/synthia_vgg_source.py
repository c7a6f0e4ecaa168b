"""SYNTHIA source-only pretraining (16 classes), DeepLab-v2 VGG-16.

    python train.py --config=configs/synthia_vgg_source.py --workdir=runs/synthia_vgg_source

Needs: TFDS `synthia/1280x760`, `cityscapes/1024x512`, and `pretrained/vgg16_imagenet`
(see configs/gta_vgg_source.py). Then adapt with `configs/synthia_vgg.py
--config.init_checkpoint=runs/synthia_vgg_source`.
"""

from configs import synthia_vgg
from udajax import configuration


def get_config():
  return configuration.make_source_only(synthia_vgg.get_config())
