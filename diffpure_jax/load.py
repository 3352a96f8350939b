"""Load converted or trained checkpoints (`checkpoints/NAME/`) into ready-to-use models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import models
from .checkpoint import load_variables, read_config
from .classifier import Classifier
from .purify import Purifier, PurifyConfig
from .score import ScoreModel, eps_continuous_score_fn
from .sde import VPSDE

PARAMETERIZATIONS = {"eps_continuous": eps_continuous_score_fn}


def _module_and_variables(directory: str, kind: str):
    config = read_config(directory)
    if config.get("kind") != kind:
        raise ValueError(
            f"{directory!r} holds a {config.get('kind')!r} model, not a {kind!r} model."
        )
    module = models.build_model(config["architecture"], config["kwargs"])
    shape = tuple(config["input_shape"])
    example = (jnp.zeros((1, *shape)),) + ((jnp.zeros((1,)),) if kind == "score" else ())
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example)
    return config, module, load_variables(directory, abstract), shape


def load_score_model(directory: str) -> ScoreModel:
    """The score model saved at `directory` (see checkpoints/README.md)."""
    config, module, variables, shape = _module_and_variables(directory, "score")
    sde = VPSDE(**config.get("sde", {}))
    parameterization = config.get("parameterization", "eps_continuous")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown score parameterization {parameterization!r}")
    return ScoreModel(variables, PARAMETERIZATIONS[parameterization](module.apply, sde), sde, shape)


def load_classifier(directory: str) -> Classifier:
    """The classifier saved at `directory`: `classifier(x)` for x (B, H, W, C) in [0, 1]."""
    _, module, variables, shape = _module_and_variables(directory, "classifier")
    return Classifier(variables, module.apply, shape)


def load_purifier(directory: str, config: PurifyConfig | None = None, **options) -> Purifier:
    """A Purifier from a score checkpoint; `options` are PurifyConfig fields (t_star, grad, ...)."""
    config = dataclasses.replace(config or PurifyConfig(), **options)
    return Purifier(load_score_model(directory), config)
