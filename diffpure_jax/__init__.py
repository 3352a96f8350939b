"""diffpure_jax: DiffPure (Nie et al., ICML 2022) diffusion purification in JAX.

purifier = load_purifier("checkpoints/cifar10-ddpmpp-deep-cont", t_star=0.1, grad="exact")
classifier = load_classifier("checkpoints/cifar10-wrn-28-10")
defended = DefendedClassifier(purifier, classifier)
logits = defended(x, key)                      # x: (B, 32, 32, 3) in [0, 1]
"""

from .classifier import Classifier
from .ddpm import DDPMConfig, DDPMPurifier
from .defense import DefendedClassifier, undefended
from .load import load_classifier, load_purifier, load_score_model
from .purify import (
    GRAD_MODES,
    AbstractPurifier,
    Purifier,
    PurifyConfig,
    Trajectory,
    purify,
    purify_eot,
    purify_trajectory,
)
from .score import ScoreModel
from .sde import VPSDE

__all__ = [
    "GRAD_MODES",
    "AbstractPurifier",
    "Classifier",
    "DDPMConfig",
    "DDPMPurifier",
    "DefendedClassifier",
    "Purifier",
    "PurifyConfig",
    "ScoreModel",
    "VPSDE",
    "load_classifier",
    "load_purifier",
    "load_score_model",
    "purify",
    "purify_eot",
    "purify_trajectory",
    "Trajectory",
    "undefended",
]
