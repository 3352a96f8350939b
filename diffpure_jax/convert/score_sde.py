"""Convert score_sde_pytorch's CIFAR-10 NCSN++ checkpoint (`checkpoint_8.pth`) to Flax.

The file is {'model': DataParallel state_dict ('module.' keys), 'ema': {'shadow_params': [...]},
'optimizer': ..., 'step': ...}. DiffPure evaluates with the EMA weights: `shadow_params` is an
unnamed list in `model.parameters()` order, which is the order of the 'model' state_dict keys
without the buffer 'sigmas'. The 'model' entry is NOT the EMA network (`weights='model'` takes it
anyway, for comparisons).

The sizes nf, num_channels and num_res_blocks can be read from the file (`infer_architecture`); the
command line does so (`infer=True`), explicit options win.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from ..checkpoint import save_variables
from ..models.ncsnpp import NCSNpp
from .common import (
    ConversionError,
    architecture_hint,
    check_out_dir,
    convert_state_dict,
    expected_torch_shapes,
    load_torch_file,
    score_template,
    strip_prefix,
    to_numpy_state_dict,
    with_overrides,
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
    return with_overrides(CIFAR10_DDPMPP_DEEP_CONTINUOUS, overrides, "NCSN++")


def abstract_variables(kwargs: dict, shown: dict | None = None):
    """The Flax variables tree of NCSNpp(**kwargs), shapes only; options that make no model
    fail as a ConversionError naming `shown` (default: all kwargs)."""
    return score_template(NCSNpp, kwargs, kwargs["num_channels"], jnp.float32, shown)


_MODULE_KEY = re.compile(r"^all_modules\.(\d+)\.(.+)$")


def infer_architecture(
    state_dict: Mapping[str, Any],
    ch_mult: Sequence[int] = CIFAR10_DDPMPP_DEEP_CONTINUOUS["ch_mult"],
) -> dict:
    """The NCSN++ sizes that a bare state_dict's key names and shapes give: nf and num_channels
    from the first conv (nf, num_channels, 3, 3), num_res_blocks from the number of residual
    blocks (len(ch_mult) * (2 num_res_blocks + 3) of them). Sizes it cannot read are left out."""
    modules: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        m = _MODULE_KEY.match(key)
        if m:
            modules.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(getattr(value, "shape", ()))
    out: dict[str, Any] = {}
    for i in sorted(modules):
        shape = modules[i].get("weight", ())
        if len(shape) == 4:  # the input conv3x3 (the time-embedding Dense layers come first)
            out["nf"], out["num_channels"] = int(shape[0]), int(shape[1])
            break
    n_blocks = sum("Conv_1.weight" in params for params in modules.values())
    levels = len(ch_mult) if isinstance(ch_mult, list | tuple) else 0
    if n_blocks and levels and n_blocks % levels == 0:
        per_level = n_blocks // levels - 3
        if per_level >= 2 and per_level % 2 == 0:
            out["num_res_blocks"] = per_level // 2
    return out


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


def convert_score_sde(
    src: str, out_dir: str, weights: str = "ema", infer: bool = False, **overrides: Any
) -> dict:
    """Convert `src` (checkpoint_8.pth) into a diffpure_jax checkpoint at `out_dir`.

    `overrides` change the architecture (e.g. nf=16, num_res_blocks=2 for the small test model).
    With `infer`, the sizes not given in `overrides` are read from the file
    (`infer_architecture`) and listed in the config's source.inferred. Returns the saved config.
    """
    architecture(**overrides)  # unknown options fail before the file is read
    check_out_dir(out_dir)
    state_dict = score_sde_state_dict(load_torch_file(src), weights)
    ch_mult = overrides.get("ch_mult", CIFAR10_DDPMPP_DEEP_CONTINUOUS["ch_mult"])
    found = infer_architecture(state_dict, ch_mult)
    inferred = {k: v for k, v in found.items() if k not in overrides} if infer else {}
    kwargs = architecture(**inferred, **overrides)
    variables = convert_state_dict(
        state_dict,
        abstract_variables(kwargs, shown={**inferred, **overrides}),
        what=f"checkpoint {os.path.basename(src)!r}",
        hint=architecture_hint(found, kwargs, ("ch_mult", "attn_resolutions", "image_size")),
    )
    config = {
        "kind": "score",
        "architecture": "ncsnpp",
        "kwargs": kwargs,
        "input_shape": [kwargs["image_size"], kwargs["image_size"], kwargs["num_channels"]],
        "parameterization": "eps_continuous",
        "sde": SDE,
        "source": {"file": os.path.basename(src), "weights": weights},
    }
    if inferred:
        config["source"]["inferred"] = inferred
    save_variables(out_dir, variables, config)
    return config
