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
from .ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule
from .purify import Purifier, PurifyConfig
from .score import ScoreModel, eps_continuous_score_fn, guided_diffusion_score_fn
from .sde import VPSDE

# config.json's "parameterization" -> how the network's output becomes a score (diffpure_jax.score)
PARAMETERIZATIONS = {
    "eps_continuous": eps_continuous_score_fn,
    "guided_diffusion": guided_diffusion_score_fn,
}
# DDPM eps networks (SDEdit's CelebA-HQ model): purified by ancestral steps (diffpure_jax.ddpm),
# not behind a score function.
DDPM_PARAMETERIZATION = "ddpm_eps"
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
    if parameterization == DDPM_PARAMETERIZATION:
        raise CheckpointError(
            f"{path}: a DDPM eps network (parameterization {parameterization!r}), purified by "
            "DDPM ancestral steps, not a VP-SDE score model; load it with "
            "diffpure_jax.load_purifier (a ddpm.DDPMPurifier)."
        )
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


def load_purifier(
    directory: str, config: PurifyConfig | DDPMConfig | None = None, **options
) -> Purifier | DDPMPurifier:
    """The purifier of a score checkpoint: a `Purifier` (VP-SDE), or a `ddpm.DDPMPurifier` when
    config.json's parameterization is "ddpm_eps" (DiffPure's CelebA-HQ DDPM).

    `options` are fields of `config` (default PurifyConfig(), e.g. t_star, dt, grad). For a
    DDPM checkpoint, `config` may be a DDPMConfig (options are its fields), or a PurifyConfig
    (the command line's) or None: then a PurifyConfig with `options` applied is converted by
    `DDPMConfig.from_purify_config` (its t_star, grad, checkpoints, input_size and score_dtype;
    `dt` must be the schedule's fixed step 1/T, 1e-3, and is otherwise ignored; solver fields
    other than their defaults are refused). With config None and only DDPMConfig fields in
    `options`, the DDPMConfig defaults apply (t_star 0.5, DiffPure's CelebA-HQ)."""
    if read_config(directory, "score").get("parameterization") == DDPM_PARAMETERIZATION:
        return _load_ddpm_purifier(directory, config, options)
    if isinstance(config, DDPMConfig):
        raise CheckpointError(
            f"{os.path.join(directory, CONFIG_FILE)}: a VP-SDE score model, not a DDPM "
            "checkpoint; purify it with a PurifyConfig, not a DDPMConfig."
        )
    config = dataclasses.replace(config or PurifyConfig(), **options)
    return Purifier(load_score_model(directory), config)


def _load_ddpm_purifier(directory: str, config, options: dict) -> DDPMPurifier:
    saved, module, variables, shape = _module_and_variables(directory, "score")
    path = os.path.join(directory, CONFIG_FILE)
    try:
        schedule = DDPMSchedule.from_config(saved.get("ddpm", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: field 'ddpm' is invalid ({first_line(e)}); {_FIX}."
        ) from None
    ddpm_fields = {f.name for f in dataclasses.fields(DDPMConfig)}
    if isinstance(config, DDPMConfig):
        config = dataclasses.replace(config, **options)
    elif config is None and set(options) <= ddpm_fields:
        config = DDPMConfig(**options)
    else:
        config = dataclasses.replace(config or PurifyConfig(), **options)
        config = DDPMConfig.from_purify_config(config, schedule.num_timesteps)
    return DDPMPurifier(variables, module.apply, schedule, shape, config)
