"""DiffPure on CIFAR-10 as the paper evaluates it (`python -m experiments.cifar_autoattack`).

WRN-28-10 behind the score_sde NCSN++ (t* = 0.1 for Linf, 0.075 for L2), dt = 1e-3, the paper's
adjoint gradient, AutoAttack `rand` (its own EOT 20), 512 test images.
"""

from __future__ import annotations

import dataclasses

from experiments.attack import AttackRun
from experiments.config import config_words

# norm -> (eps, t*): the paper's settings (L1 is not in the paper; StAdv is its unseen-threat
# study's flow bound, attacked by StAdv, at the t* = 0.125 of its ResNet-50 runs).
THREATS = {"Linf": (8 / 255, 0.1), "L2": (0.5, 0.075), "L1": (12.0, 0.1), "StAdv": (0.05, 0.125)}


def get_config(arg: str = "") -> AttackRun:
    """Linf (default), L2, L1 or StAdv: the threat and the t* that goes with it."""
    words = config_words(arg, tuple(THREATS))
    norm = words[-1] if words else "Linf"
    eps, t_star = THREATS[norm]
    return dataclasses.replace(
        AttackRun(),
        dataset="cifar10",
        classifier="checkpoints/cifar10-wrn-28-10",
        score="checkpoints/cifar10-ddpmpp-deep-cont",
        norm=norm,
        eps=eps,
        t_star=t_star,
        dt=1e-3,
        grad="adjoint",
        attack="stadv" if norm == "StAdv" else "autoattack",
        version="rand",
        n_queries=5000,
        n_examples=512,
        batch_size=64,
        workdir="workdir/cifar_autoattack",
    )
