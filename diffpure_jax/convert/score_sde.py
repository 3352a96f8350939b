"""Convert score_sde_pytorch's CIFAR-10 NCSN++ checkpoint (`checkpoint_8.pth`) to Flax.

The file is {'model': DataParallel state_dict ('module.' keys), 'ema': {'shadow_params': [...]},
'optimizer': ..., 'step': ...}. DiffPure evaluates with the EMA weights: `shadow_params` is an
unnamed list in `model.parameters()` order, which is the order of the 'model' state_dict keys
without the buffer 'sigmas'. The 'model' entry is NOT the EMA network (`weights='model'` takes it
anyway, for comparisons).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from ..checkpoint import save_variables
from ..models.ncsnpp import NCSNpp
from .common import (
    ConversionError,
    convert_state_dict,
    expected_torch_shapes,
    load_torch_file,
    strip_prefix,
    to_numpy_state_dict,
)

# score_sde_pytorch configs/vp/cifar10_ddpmpp_deep_continuous.py (= DiffPure configs/cifar10.yml).
CIFAR10_DDPMPP_DEEP_CONTINUOUS = {
    "nf": 128,
    "ch_mult": (1, 2, 2, 2),
    "num_res_blocks": 8,
    "attn_resolutions": (16,),
    "image_size": 32,
    "num_channels": 3,
    "dropout": 0.1,
    "skip_rescale": True,
    "init_scale": 0.0,
    "conditional": True,
    "centered": True,
}
BUFFERS = ("sigmas",)
SDE = {"beta_min": 0.1, "beta_max": 20.0, "n_discrete": 1000}


def architecture(**overrides: Any) -> dict:
    """NCSNpp kwargs: the full CIFAR-10 DDPM++ deep continuous config with `overrides`."""
    unknown = set(overrides) - set(CIFAR10_DDPMPP_DEEP_CONTINUOUS)
    if unknown:
        raise ConversionError(f"unknown NCSN++ options {sorted(unknown)}")
    kwargs = {**CIFAR10_DDPMPP_DEEP_CONTINUOUS, **overrides}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def abstract_variables(kwargs: dict):
    size, channels = kwargs["image_size"], kwargs["num_channels"]
    return jax.eval_shape(
        NCSNpp(**kwargs).init,
        jax.random.key(0),
        jnp.zeros((1, size, size, channels)),
        jnp.zeros((1,)),
    )


def expected_torch_keys(**overrides: Any) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of the official model (without buffers), from the Flax template."""
    return expected_torch_shapes(abstract_variables(architecture(**overrides)))


def score_sde_state_dict(ckpt: Any, weights: str = "ema") -> dict:
    """The named numpy state_dict DiffPure runs with, from a loaded checkpoint_8.pth object."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(
            "not a score_sde_pytorch checkpoint: expected a dict with 'model' and 'ema', "
            f"got {keys}"
        )
    model = to_numpy_state_dict(strip_prefix(ckpt["model"], "module."))
    if weights == "model":
        return {k: v for k, v in model.items() if k not in BUFFERS}
    if weights != "ema":
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or "shadow_params" not in ema:
        raise ConversionError("the checkpoint has no 'ema'.'shadow_params' list (EMA weights).")
    names = [k for k in model if k not in BUFFERS]
    shadow = ema["shadow_params"]
    if len(shadow) != len(names):
        raise ConversionError(
            f"'ema'.'shadow_params' has {len(shadow)} tensors but the model has {len(names)} "
            "parameters; the EMA list cannot be named."
        )
    out = {}
    for name, tensor in zip(names, shadow, strict=True):
        value = to_numpy_state_dict({name: tensor})[name]
        if value.shape != model[name].shape:
            raise ConversionError(
                f"EMA tensor for {name} has shape {value.shape}, the model's is "
                f"{model[name].shape}: the shadow_params order does not match."
            )
        out[name] = value
    return out


def convert_score_sde(src: str, out_dir: str, weights: str = "ema", **overrides: Any) -> dict:
    """Convert `src` (checkpoint_8.pth) into a diffpure_jax checkpoint at `out_dir`.

    `overrides` change the architecture (e.g. nf=16, num_res_blocks=2 for the small test model).
    Returns the saved config.
    """
    kwargs = architecture(**overrides)
    state_dict = score_sde_state_dict(load_torch_file(src), weights)
    variables = convert_state_dict(state_dict, abstract_variables(kwargs), what=f"checkpoint {src}")
    config = {
        "kind": "score",
        "architecture": "ncsnpp",
        "kwargs": kwargs,
        "input_shape": [kwargs["image_size"], kwargs["image_size"], kwargs["num_channels"]],
        "parameterization": "eps_continuous",
        "sde": SDE,
        "source": {"file": os.path.basename(src), "weights": weights},
    }
    save_variables(out_dir, variables, config)
    return config
