r"""GTA5 source-only pretraining, DeepLab-v2 VGG-16.

    python train.py --config=configs/gta_vgg_source.py --workdir=runs/gta_vgg_source

Needs: TFDS `gta5/1280x720`, `cityscapes/1024x512` (eval), and torchvision's VGG-16 converted:
    python data_prep/convert_torch_checkpoint.py --backbone=vgg16 --input=vgg16-397923af.pth \
        --output=pretrained/vgg16_imagenet
Then adapt with `configs/gta_vgg.py --config.init_checkpoint=runs/gta_vgg_source`.
"""

from configs import gta_vgg
from udajax import configuration


def get_config():
  return configuration.make_source_only(gta_vgg.get_config())
