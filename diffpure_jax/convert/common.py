"""Shared converter machinery: safe reading of PyTorch files and name/shape-checked mapping of a
PyTorch state_dict onto a Flax variables tree.

Each converter describes, for every leaf of the Flax variables tree, which PyTorch key it comes
from and how the array is laid out (`Rule`). `convert_state_dict` then checks the state_dict against
that description and fails naming every missing, unused and misshaped key.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
    """A checkpoint does not match the model it is being converted into."""


def load_torch_file(path: str) -> Any:
    """Read a PyTorch `.pth`/`.pt`/`.ckpt` with `torch.load(weights_only=True)`.

    Only tensors, containers and primitive values are accepted: a pickle that would run code is
    refused. Raises ConversionError with what to do for a missing file, a non-PyTorch file or an
    unsafe pickle; ImportError if torch (the `convert` extra) is not installed.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file {path!r} does not exist.")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Converting PyTorch checkpoints needs torch: pip install -e '.[convert]'"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path!r} is refused: it is a pickle that needs more than tensors and containers to "
            f"load (torch.load(weights_only=True) said: {str(e).splitlines()[0]}). diffpure_jax "
            "never runs code from a checkpoint; re-save it as a plain state_dict."
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ConversionError(
            f"{path!r} is not a PyTorch checkpoint that torch.load can read "
            f"({e.__class__.__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''})."
        ) from e


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors (or arrays) -> float/int numpy arrays, keys unchanged."""
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drop `prefix` from every key that starts with it (e.g. DataParallel's 'module.')."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


# --- layouts: PyTorch array -> Flax array ------------------------------------------------------


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """Conv2d weight OIHW -> HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """Linear weight (out, in) -> (in, out)."""
    return np.transpose(w, (1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


def _inverse_shape(layout: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout is conv_kernel:
        h, w, i, o = shape
        return (o, i, h, w)
    if layout is dense_kernel:
        i, o = shape
        return (o, i)
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one Flax leaf comes from: the PyTorch key and the layout transform."""

    torch_key: str
    layout: Callable[[np.ndarray], np.ndarray] = identity


def default_rule(path: tuple[str, ...], ndim: int) -> Rule:
    """The rule for modules named after their PyTorch counterparts.

    A Flax path ('a', 'b.3', 'Conv_0', 'kernel') maps to 'a.b.3.Conv_0.weight'. The collection
    name ('params', 'batch_stats') is dropped. Leaf names: kernel -> weight (conv OIHW->HWIO or
    dense (out,in)->(in,out) by rank), scale -> weight, bias -> bias, mean -> running_mean,
    var -> running_var; anything else keeps its name (e.g. NIN's 'W', 'b').
    """
    *modules, leaf = path[1:]
    prefix = ".".join(modules)
    if leaf == "kernel":
        return Rule(f"{prefix}.weight", conv_kernel if ndim == 4 else dense_kernel)
    name = {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    return Rule(f"{prefix}.{name}" if prefix else name)


def expected_torch_shapes(
    abstract_variables: Any, rule: Callable[[tuple[str, ...], int], Rule] = default_rule
) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} that a Flax variables tree needs (checked without any weights)."""
    flat = traverse_util.flatten_dict(abstract_variables)
    out = {}
    for path, leaf in flat.items():
        r = rule(path, len(leaf.shape))
        out[r.torch_key] = _inverse_shape(r.layout, tuple(leaf.shape))
    return out


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Raise ConversionError naming every missing, unused and misshaped key."""
    ignore = set(ignore)
    got = {k: tuple(v) for k, v in got.items() if k not in ignore}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    misshaped = sorted(
        f"{k}: expected {tuple(expected[k])}, got {got[k]}"
        for k in set(expected) & set(got)
        if tuple(expected[k]) != got[k]
    )
    if missing or extra or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {', '.join(extra)}")
        if misshaped:
            parts.append(f"misshaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
        raise ConversionError(
            f"the {what} does not match the model architecture: "
            + " | ".join(parts)
            + ". Check that the file and the architecture options (depth, width, nf, ...) belong"
            " together."
        )


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables: Any,
    rule: Callable[[tuple[str, ...], int], Rule] = default_rule,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> Any:
    """Map a numpy state_dict onto the structure of `abstract_variables` (Flax variables tree).

    Every key of `state_dict` not in `ignore` must be used, and every leaf must be present with
    the right shape; otherwise ConversionError names them all.
    """
    expected = expected_torch_shapes(abstract_variables, rule)
    check_keys(expected, {k: np.shape(v) for k, v in state_dict.items()}, ignore, what)
    flat = traverse_util.flatten_dict(abstract_variables)
    out = {}
    for path, leaf in flat.items():
        r = rule(path, len(leaf.shape))
        out[path] = np.asarray(r.layout(np.asarray(state_dict[r.torch_key])), dtype=leaf.dtype)
    return traverse_util.unflatten_dict(out)
