"""SYNTHIA -> Cityscapes (16 classes), DeepLab-v2 ResNet-101, MaxSquare IW (Chen et al., ICCV 2019).

    python train.py --config=configs/synthia_maxsquare.py --workdir=runs/synthia_maxsquare

Same data, model, source-only init, optimiser, schedule and evaluation as configs/synthia.py;
only the adaptation objective differs: the image-wise weighted max-square loss alone, weight
`loss.lambda_em` = 0.1 and IW ratio `loss.iw_ratio` = 0.2, the values of ZJULearning/MaxSquareLoss
(README "MaxSquare+IW": `--lambda_target 0.1 --IW_ratio 0.2`; their code runs SYNTHIA with the
same solver and defaults). Note configs/synthia.py's EM term uses ratio 0.0 (Toldo et al.'s
setting); this row keeps MaxSquare's own 0.2.
Paper's number (13 classes, `eval/mIoU13`, as quoted in Toldo et al.'s Table): 46.9 mIoU.
"""

from configs import baselines
from configs import synthia


def get_config():
  return baselines.apply(synthia.get_config(), "maxsquare")
