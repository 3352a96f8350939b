"""DiffPure on ImageNet as the paper evaluates it (`python -m experiments.imagenet_autoattack`).

The guided-diffusion 256 x 256 unconditional ADM as purifier (t* = 0.15, dt = 1e-3: 150 reverse
steps; the 224 x 224 classifier input resized to 256 and back), the paper's adjoint gradient,
AutoAttack `rand` (its own EOT 20) at Linf eps 0.0157 (the official scripts' value; 4/255 is
0.015686), 512 validation images (resize 256, centre crop 224). Words of `--config`: the
classifier, `resnet50` (default), `wrn-50-2` or `deit-s`.
"""

from __future__ import annotations

import dataclasses

from experiments.attack import AttackRun
from experiments.config import config_words

SCORE = "checkpoints/imagenet-adm-256-uncond"
# config word -> classifier checkpoint (checkpoints/README.md: where to get each, its converter)
CLASSIFIERS = {
    "resnet50": "checkpoints/imagenet-resnet50",
    "wrn-50-2": "checkpoints/imagenet-wrn-50-2",
    "deit-s": "checkpoints/imagenet-deit-s",
}


def get_config(arg: str = "") -> AttackRun:
    """resnet50 (default), wrn-50-2 or deit-s: the classifier behind the purifier."""
    words = config_words(arg, tuple(CLASSIFIERS))
    return dataclasses.replace(
        AttackRun(),
        dataset="imagenet",
        classifier=CLASSIFIERS[words[-1] if words else "resnet50"],
        score=SCORE,
        input_size=224,
        norm="Linf",
        eps=0.0157,
        t_star=0.15,
        dt=1e-3,
        grad="adjoint",
        attack="autoattack",
        version="rand",
        n_queries=5000,
        n_examples=512,
        batch_size=16,
        workdir="workdir/imagenet_autoattack",
    )
