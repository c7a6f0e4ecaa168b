r"""GTA5 source-only pretraining, DeepLab-v2 ResNet-101 (the paper's "source only" row).

    python train.py --config=configs/gta_source.py --workdir=runs/gta_source

Needs: TFDS `gta5/1280x720` and `cityscapes/1024x512` (eval), and the ImageNet init converted
from `DeepLab_resnet_pretrained_init-f81d91e8.pth`:
    python data_prep/convert_torch_checkpoint.py \
        --input=DeepLab_resnet_pretrained_init-f81d91e8.pth \
        --output=pretrained/deeplab_r101_imagenet
Expect (paper, Cityscapes val): 37.0 mIoU. Poly schedule of 200,000 steps stopped at 80,000.
Then adapt with `configs/gta.py --config.init_checkpoint=runs/gta_source`.
"""

from udajax import configuration


def get_config():
  return configuration.make_source_only(configuration.base_config())
