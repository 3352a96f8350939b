"""Load converted or trained checkpoints (`checkpoints/NAME/`) into ready-to-use models.

A checkpoint that cannot be loaded raises `diffpure_jax.checkpoint.CheckpointError` (a
ValueError) with a one-line message naming the file, the field and what to do.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from . import models
from .checkpoint import CONFIG_FILE, CheckpointError, first_line, load_variables, read_config
from .classifier import Classifier
from .purify import Purifier, PurifyConfig
from .score import ScoreModel, eps_continuous_score_fn
from .sde import VPSDE

PARAMETERIZATIONS = {"eps_continuous": eps_continuous_score_fn}
_FIX = "restore config.json or re-convert"


def _module_and_variables(directory: str, kind: str, restore: bool = True):
    config = read_config(directory, kind)
    path = os.path.join(directory, CONFIG_FILE)
    architecture, kwargs = config["architecture"], config["kwargs"]
    try:
        module = models.build_model(architecture, kwargs)
    except TypeError as e:  # an option the architecture does not have
        raise CheckpointError(
            f"{path}: field 'kwargs' {kwargs} does not build a {architecture} "
            f"({first_line(e)}); {_FIX}."
        ) from None
    except ValueError as e:  # an unknown architecture
        raise CheckpointError(
            f"{path}: field 'architecture' is invalid ({first_line(e)}); {_FIX}."
        ) from None
    shape = tuple(config["input_shape"])
    example = (jnp.zeros((1, *shape)),) + ((jnp.zeros((1,)),) if kind == "score" else ())
    try:
        abstract = jax.eval_shape(module.init, jax.random.key(0), *example)
    except Exception as e:  # the module's own checks (e.g. WideResNet depth 6n+4) or flax's
        raise CheckpointError(
            f"{path}: field 'kwargs' {kwargs} does not build a {architecture} for input_shape "
            f"{list(shape)} ({type(e).__name__}: {first_line(e)}); {_FIX}."
        ) from None
    return config, module, load_variables(directory, abstract, restore), shape


def check_checkpoint(directory: str, kind: str) -> None:
    """Raise CheckpointError if the `kind` ('score' or 'classifier') checkpoint at `directory`
    would not load: config.json and the stored keys and shapes, without reading the weights."""
    _module_and_variables(directory, kind, restore=False)


def load_score_model(directory: str) -> ScoreModel:
    """The score model saved at `directory` (see checkpoints/README.md)."""
    config, module, variables, shape = _module_and_variables(directory, "score")
    path = os.path.join(directory, CONFIG_FILE)
    try:
        sde = VPSDE(**config.get("sde", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: field 'sde' is invalid ({first_line(e)}); {_FIX}."
        ) from None
    parameterization = config.get("parameterization", "eps_continuous")
    if parameterization not in PARAMETERIZATIONS:
        raise CheckpointError(
            f"{path}: field 'parameterization' must be one of {tuple(PARAMETERIZATIONS)}, got "
            f"{parameterization!r}; {_FIX}."
        )
    return ScoreModel(variables, PARAMETERIZATIONS[parameterization](module.apply, sde), sde, shape)


def load_classifier(directory: str) -> Classifier:
    """The classifier saved at `directory`: `classifier(x)` for x (B, H, W, C) in [0, 1]."""
    _, module, variables, shape = _module_and_variables(directory, "classifier")
    return Classifier(variables, module.apply, shape)


def load_purifier(directory: str, config: PurifyConfig | None = None, **options) -> Purifier:
    """A Purifier from a score checkpoint; `options` are PurifyConfig fields (t_star, grad, ...)."""
    config = dataclasses.replace(config or PurifyConfig(), **options)
    return Purifier(load_score_model(directory), config)
