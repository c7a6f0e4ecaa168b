"""GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, feature-level adversarial adaptation
(Tsai et al., "Learning to Adapt Structured Output Space", CVPR 2018, "feature" row).

    python train.py --config=configs/gta_adversarial.py --workdir=runs/gta_adversarial

Same data, model, source-only init, optimiser, schedule and evaluation as configs/gta.py; only
the adaptation objective differs (udajax/methods/adversarial.py): their FCDiscriminator
(model/discriminator.py of wasidennis/AdaptSegNet: 4x4 convolutions, stride 2, 64-128-256-512-1,
leaky ReLU 0.2) on the encoder features (ResNet-101 layer4, the last feature map before the
classifier), BCE adversarial losses.
Sources: discriminator Adam lr 1e-4, betas (0.9, 0.99), poly decay with power 0.9
(`LEARNING_RATE_D`, `optim.Adam(..., betas=(0.9, 0.99))`, `adjust_learning_rate_D` in their
train_gta2cityscapes_multi.py); lambda_adv = 1e-3 = their `LAMBDA_ADV_TARGET2`, the weight of
the adversarial loss on the network's last level (their released code has no feature-level
script; the single-level setting's weight is used). The discriminator's poly schedule runs over
`train.num_steps`, as the segmenter's.
Paper's number (as quoted in Toldo et al.'s Table): 39.3 mIoU.
"""

from configs import baselines
from configs import gta


def get_config():
  return baselines.apply(gta.get_config(), "adversarial")
