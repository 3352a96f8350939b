"""Convert the official CIFAR-10 WideResNet classifier checkpoints (PyTorch) to Flax.

Variants (how DiffPure / RobustBench load each file):

* 'robustbench-wrn': RobustBench 'Standard' WRN-28-10 (`cifar10-wideresnet-28-10`);
  `ckpt['state_dict']` if present, else `ckpt`; 'module.' and 'model.' prefixes removed.
* 'diffpure-wrn-dropout': DiffPure WRN-70-16 with dropout 0.3 (`cifar10-wrn-70-16-dropout`);
  a plain state_dict with a 'module.' prefix.
* 'robustbench-dm-wrn': RobustBench DMWideResNet-70-16 (`cifar10-wideresnet-70-16`);
  `ckpt['model_state_dict']` with a 'module.0.' prefix.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import models
from ..checkpoint import save_variables
from .common import (
    ConversionError,
    convert_state_dict,
    expected_torch_shapes,
    load_torch_file,
    strip_prefix,
    to_numpy_state_dict,
)

INPUT_SHAPE = (32, 32, 3)
_IGNORE = ("*num_batches_tracked",)

# variant -> (architecture name for models.build_model, default kwargs, ignored key patterns)
VARIANTS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "robustbench-wrn": (
        "wideresnet",
        {"depth": 28, "widen_factor": 10, "num_classes": 10, "drop_rate": 0.0, "normalize": False},
        _IGNORE,
    ),
    "diffpure-wrn-dropout": (
        "wideresnet",
        {"depth": 70, "widen_factor": 16, "num_classes": 10, "drop_rate": 0.3, "normalize": True},
        _IGNORE,
    ),
    "robustbench-dm-wrn": (
        "dm_wideresnet",
        {"depth": 70, "width": 16, "num_classes": 10},
        _IGNORE,
    ),
}


def _variant(variant: str) -> tuple[str, dict, tuple[str, ...]]:
    if variant not in VARIANTS:
        raise ConversionError(
            f"unknown classifier variant {variant!r}; known: {', '.join(sorted(VARIANTS))}"
        )
    return VARIANTS[variant]


def _top_level(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj.keys()]
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        return f"top-level keys: [{shown}]"
    return f"type {type(obj).__name__}"


def _require_state_dict(obj: Any, variant: str, where: str) -> Mapping:
    """`obj` must be a flat mapping of tensors (no nested wrapper dicts)."""
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"variant {variant!r} expects {where} to be a state_dict (a dict of tensors), got "
            f"{_top_level(obj)}."
        )
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested:
        raise ConversionError(
            f"variant {variant!r} expects {where} to be a plain state_dict, but it holds nested "
            f"dicts under {nested[:10]} ({_top_level(obj)}). Is this the right variant?"
        )
    return obj


def classifier_state_dict(obj: Any, variant: str) -> dict[str, np.ndarray]:
    """Unwrap a loaded checkpoint as the official loader of `variant` does -> bare numpy state_dict.

    Prefixes are only removed from keys that carry them.
    """
    _variant(variant)
    if variant == "robustbench-wrn":
        if isinstance(obj, Mapping) and "state_dict" in obj:
            sd = _require_state_dict(obj["state_dict"], variant, "ckpt['state_dict']")
        else:
            sd = _require_state_dict(obj, variant, "the checkpoint (no 'state_dict' key)")
        sd = strip_prefix(strip_prefix(sd, "module."), "model.")
    elif variant == "diffpure-wrn-dropout":
        sd = strip_prefix(_require_state_dict(obj, variant, "the checkpoint"), "module.")
    else:  # robustbench-dm-wrn
        if not isinstance(obj, Mapping) or "model_state_dict" not in obj:
            raise ConversionError(
                f"variant {variant!r} expects a dict with a 'model_state_dict' entry; the file "
                f"has {_top_level(obj)}."
            )
        sd = _require_state_dict(obj["model_state_dict"], variant, "ckpt['model_state_dict']")
        sd = strip_prefix(sd, "module.0.")
    return to_numpy_state_dict(sd)


def _ignored(keys: Iterable[str], patterns: Iterable[str]) -> set[str]:
    patterns = tuple(patterns)
    return {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _abstract_variables(architecture: str, kwargs: dict) -> Any:
    module = models.build_model(architecture, kwargs)
    x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def _arch_kwargs(variant: str, arch_overrides: dict) -> tuple[str, dict, tuple[str, ...]]:
    architecture, defaults, ignore = _variant(variant)
    unknown = sorted(set(arch_overrides) - set(defaults))
    if unknown:
        raise ConversionError(
            f"unknown option(s) {unknown} for variant {variant!r}; known: {sorted(defaults)}"
        )
    return architecture, {**defaults, **arch_overrides}, ignore


def expected_torch_keys(variant: str, **arch_overrides) -> dict[str, tuple[int, ...]]:
    """{bare PyTorch key: shape} the Flax model of `variant` needs (no weights are built);
    ignored buffers such as num_batches_tracked are not listed."""
    architecture, kwargs, _ = _arch_kwargs(variant, arch_overrides)
    return expected_torch_shapes(_abstract_variables(architecture, kwargs))


def convert_classifier(src: str, out_dir: str, variant: str, **arch_overrides) -> dict:
    """Convert the PyTorch checkpoint `src` of `variant` into a diffpure_jax checkpoint `out_dir`.

    `arch_overrides` replace the default (full official) sizes, e.g. depth=16, widen_factor=2.
    Raises ConversionError naming every missing, unused or misshaped key. Returns the config.
    """
    architecture, kwargs, ignore = _arch_kwargs(variant, arch_overrides)
    state_dict = classifier_state_dict(load_torch_file(src), variant)
    abstract = _abstract_variables(architecture, kwargs)
    variables = convert_state_dict(
        state_dict,
        abstract,
        ignore=_ignored(state_dict, ignore),
        what=f"{variant} checkpoint {os.path.basename(src)!r}",
    )
    config = {
        "kind": "classifier",
        "architecture": architecture,
        "kwargs": kwargs,
        "input_shape": list(INPUT_SHAPE),
        "source": {"file": os.path.basename(src), "variant": variant},
    }
    save_variables(out_dir, variables, config)
    return config
