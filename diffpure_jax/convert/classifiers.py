"""Convert the official CIFAR-10 WideResNet classifier checkpoints (PyTorch) to Flax.

Variants (how DiffPure / RobustBench load each file):

* 'robustbench-wrn': RobustBench 'Standard' WRN-28-10 (`cifar10-wideresnet-28-10`);
  `ckpt['state_dict']` if present, else `ckpt`; 'module.' and 'model.' prefixes removed.
* 'diffpure-wrn-dropout': DiffPure WRN-70-16 with dropout 0.3 (`cifar10-wrn-70-16-dropout`);
  a plain state_dict with a 'module.' prefix.
* 'robustbench-dm-wrn': RobustBench DMWideResNet-70-16 (`cifar10-wideresnet-70-16`);
  `ckpt['model_state_dict']` with a 'module.0.' prefix.

Depth, width and num_classes can be read from the file (`infer_architecture`); the command line
does so (`infer=True`), explicit options win. drop_rate and normalize are not stored in a file.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import models
from ..checkpoint import save_variables
from .common import (
    ConversionError,
    architecture_hint,
    check_out_dir,
    convert_state_dict,
    expected_torch_shapes,
    load_torch_file,
    model_template,
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


def _abstract_variables(architecture: str, kwargs: dict, shown: dict | None = None) -> Any:
    def build():
        module = models.build_model(architecture, kwargs)
        x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), jnp.float32)
        return jax.eval_shape(module.init, jax.random.key(0), x)

    return model_template(build, kwargs, shown)


# architecture -> (block key pattern of group {g}, its 3 groups, first conv of the first group,
#                  width option, classifier layer)
_LAYOUT = {
    "wideresnet": (
        r"block{g}\.layer\.(\d+)\.",
        (1, 2, 3),
        "block1.layer.0.conv1.weight",
        "widen_factor",
        "fc",
    ),
    "dm_wideresnet": (
        r"layer\.{g}\.block\.(\d+)\.",
        (0, 1, 2),
        "layer.0.block.0.conv_0.weight",
        "width",
        "logits",
    ),
}


def infer_architecture(variant: str, state_dict: Mapping[str, Any]) -> dict:
    """The sizes a bare state_dict's key names and shapes give for `variant`: depth (6n+4 with n
    blocks in each of the 3 groups), the width (the first block's channels / 16) and num_classes.
    Sizes it cannot read unambiguously are left out."""
    block, groups, first_conv, width_option, head = _LAYOUT[_variant(variant)[0]]
    out: dict[str, Any] = {}
    counts = set()
    for g in groups:
        pattern = re.compile(block.format(g=g))
        counts.add(len({m.group(1) for k in state_dict if (m := pattern.match(k))}))
    if len(counts) == 1 and (n := counts.pop()) > 0:
        out["depth"] = 6 * n + 4
    shape = tuple(getattr(state_dict.get(first_conv), "shape", ()))
    if len(shape) == 4 and shape[0] % 16 == 0:
        out[width_option] = int(shape[0]) // 16
    shape = tuple(getattr(state_dict.get(f"{head}.weight"), "shape", ()))
    if len(shape) == 2:
        out["num_classes"] = int(shape[0])
    return out


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


def convert_classifier(
    src: str, out_dir: str, variant: str, infer: bool = False, **arch_overrides
) -> dict:
    """Convert the PyTorch checkpoint `src` of `variant` into a diffpure_jax checkpoint `out_dir`.

    `arch_overrides` replace the default (full official) sizes, e.g. depth=16, widen_factor=2.
    With `infer`, the sizes not given in `arch_overrides` are read from the file
    (`infer_architecture`) and listed in the config's source.inferred. Raises KeyMismatchError
    (a ConversionError) counting the missing, unused and misshaped keys. Returns the config.
    """
    _arch_kwargs(variant, arch_overrides)  # unknown options fail before the file is read
    check_out_dir(out_dir)
    state_dict = classifier_state_dict(load_torch_file(src), variant)
    found = infer_architecture(variant, state_dict)
    inferred = {k: v for k, v in found.items() if k not in arch_overrides} if infer else {}
    architecture, kwargs, ignore = _arch_kwargs(variant, {**inferred, **arch_overrides})
    abstract = _abstract_variables(architecture, kwargs, shown={**inferred, **arch_overrides})
    variables = convert_state_dict(
        state_dict,
        abstract,
        ignore=_ignored(state_dict, ignore),
        what=f"{variant} checkpoint {os.path.basename(src)!r}",
        hint=architecture_hint(found, kwargs),
    )
    config = {
        "kind": "classifier",
        "architecture": architecture,
        "kwargs": kwargs,
        "input_shape": list(INPUT_SHAPE),
        "source": {"file": os.path.basename(src), "variant": variant},
    }
    if inferred:
        config["source"]["inferred"] = inferred
    save_variables(out_dir, variables, config)
    return config
