"""SYNTHIA -> Cityscapes (16 classes), DeepLab-v2 ResNet-101, feature-level adversarial
adaptation (Tsai et al., CVPR 2018, "feature" row).

    python train.py --config=configs/synthia_adversarial.py --workdir=runs/synthia_adversarial

Same data, model, source-only init, optimiser, schedule and evaluation as configs/synthia.py;
only the adaptation objective differs. Discriminator, losses and hyperparameters as
configs/gta_adversarial.py (their code: FCDiscriminator on the layer4 features, Adam lr 1e-4,
betas (0.9, 0.99), poly decay; lambda_adv = 1e-3 = `LAMBDA_ADV_TARGET2`).
Paper's number (13 classes, `eval/mIoU13`, as quoted in Toldo et al.'s Table): 40.8 mIoU.
"""

from configs import baselines
from configs import synthia


def get_config():
  return baselines.apply(synthia.get_config(), "adversarial")
