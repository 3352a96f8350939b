"""DiffPure on CelebA-HQ as the paper evaluates it (`python -m experiments.celebahq_autoattack`).

The SDEdit CelebA-HQ DDPM purifies by ancestral sampling from t = 500 (t* = 0.5, the fixed-small
posterior variance); the classifier is DiffPure's attribute net for `--attribute` (Eyeglasses
or Smiling, its two scripts; any CelebA attribute with a converted checkpoint works). The
paper's attack is BPDA+EOT at Linf 16/255 (0.062745098) with 15 attack draws and every broken
point re-checked with 20 draws (`eot_attack_reps 15`, `eot_defense_reps 20`); `--grad exact`
with `--attack autoattack` or `pgd-eot-final` attacks the DDPM chain's exact gradient, which the
official code (under torch.no_grad) could not. 512 validation images: a seeded subset
(`--data-seed 0`), or `--data-seed -1` for the images DiffPure's own data seeds 0-63 pick.
"""

from __future__ import annotations

import dataclasses

from experiments.attack import AttackRun
from experiments.config import field

SCORE = "checkpoints/celebahq-ddpm-256"


@dataclasses.dataclass(frozen=True)
class CelebAHQRun(AttackRun):
    """An AttackRun on CelebA-HQ: the attribute decides the labels and the classifier."""

    attribute: str = field("Eyeglasses", help="CelebA attribute (the classifier's label)")


def classifier_dir(attribute: str) -> str:
    """checkpoints/celebahq-<attribute, lower case>: where its attribute net is converted to."""
    return f"checkpoints/celebahq-{attribute.lower()}"


def get_config(arg: str = "") -> CelebAHQRun:
    """The attribute (default Eyeglasses), e.g. Smiling: its labels and its classifier."""
    words = [w for w in arg.split(",") if w]
    attribute = words[-1] if words else "Eyeglasses"
    return CelebAHQRun(
        dataset="celebahq",
        attribute=attribute,
        classifier=classifier_dir(attribute),
        score=SCORE,
        norm="Linf",
        eps=0.062745098,
        t_star=0.5,
        dt=1e-3,
        grad="bpda",
        attack="bpda-eot",
        eot=15,
        recheck=20,
        n_examples=512,
        batch_size=8,
        workdir="workdir/celebahq_autoattack",
    )
