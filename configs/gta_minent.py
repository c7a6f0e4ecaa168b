"""GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, MinEnt (Vu et al., ADVENT, CVPR 2019).

    python train.py --config=configs/gta_minent.py --workdir=runs/gta_minent

Same data, model, source-only init, optimiser, schedule and evaluation as configs/gta.py; only
the adaptation objective differs: ADVENT's direct entropy loss on the target softmax
(normalised by log C, mean over pixels), `adaptation.lambda_ent` = 1e-3 = ADVENT's
`cfg.TRAIN.LAMBDA_ENT_MAIN` (advent/domain_adaptation/config.py). ADVENT also puts an entropy
loss (weight 2e-4) on an auxiliary layer3 classifier; udajax's DeepLab-v2 has a single output,
so that term is not used.
Paper's number (as quoted in Toldo et al.'s Table; ADVENT's Table 1, "MinEnt"): 42.3 mIoU.
"""

from configs import baselines
from configs import gta


def get_config():
  return baselines.apply(gta.get_config(), "minent")
