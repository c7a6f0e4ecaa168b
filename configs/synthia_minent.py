"""SYNTHIA -> Cityscapes (16 classes), DeepLab-v2 ResNet-101, MinEnt (Vu et al., ADVENT, CVPR 2019).

    python train.py --config=configs/synthia_minent.py --workdir=runs/synthia_minent

Same data, model, source-only init, optimiser, schedule and evaluation as configs/synthia.py;
only the adaptation objective differs: ADVENT's direct entropy loss, `adaptation.lambda_ent` =
1e-3 = ADVENT's `cfg.TRAIN.LAMBDA_ENT_MAIN` (the same for their SYNTHIA runs). ADVENT's
auxiliary-output entropy term is not used (single output).
Paper's number (13 classes, `eval/mIoU13`, as quoted in Toldo et al.'s Table): 44.2 mIoU.
"""

from configs import baselines
from configs import synthia


def get_config():
  return baselines.apply(synthia.get_config(), "minent")
