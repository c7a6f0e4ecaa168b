"""GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, MaxSquare IW (Chen et al., ICCV 2019) alone.

    python train.py --config=configs/gta_maxsquare.py --workdir=runs/gta_maxsquare

Same data, model, source-only init, optimiser, schedule and evaluation as configs/gta.py; only
the adaptation objective differs: the image-wise weighted max-square loss on the target softmax
(the same function as the paper's EM term), weight `loss.lambda_em` = 0.1 and IW ratio
`loss.iw_ratio` = 0.2: the values of the "MaxSquare+IW" command in the README of
ZJULearning/MaxSquareLoss (`--target_mode "IW_maxsquare" --lambda_target 0.1 --IW_ratio 0.2`)
and of their paper's implementation details.
Paper's number (MaxSquare's Table 1 "MaxSquare+IW", single level): 45.2 mIoU.
"""

from configs import baselines
from configs import gta


def get_config():
  return baselines.apply(gta.get_config(), "maxsquare")
