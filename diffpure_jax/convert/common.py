"""Shared converter machinery: safe reading of PyTorch files and name/shape-checked mapping of a
PyTorch state_dict onto a Flax variables tree.

Each converter describes, for every leaf of the Flax variables tree, which PyTorch key it comes
from and how the array is laid out (`Rule`). `convert_state_dict` then checks the state_dict against
that description and fails counting the missing, unused and misshaped keys (naming the first few).
Every ConversionError message is short and says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ..checkpoint import VARIABLES_DIR


class ConversionError(ValueError):
    """A checkpoint does not match the model it is being converted into (or cannot be read).

    The message is short (one or two lines) and says what to do; the CLI prints it as
    `error: ...`.
    """


class TorchMissingError(ConversionError, ImportError):
    """torch (the `convert` extra) is not installed; still an ImportError for library callers."""


class KeyMismatchError(ConversionError):
    """The state_dict's keys or shapes differ from the model's.

    The message counts each kind and names the first few; `missing`, `unexpected` and `misshaped`
    hold every one (misshaped: {key: (expected shape, found shape)}).
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        misshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.misshaped = misshaped


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save (zip format, the default since torch 1.6)
_PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle (protocol 2+)
_MAX_REASON = 160


def _not_a_checkpoint(name: str, head: bytes) -> str:
    """Why a file that is neither a zip nor a pickle is no checkpoint, with what to do."""
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        return f"{name} is a Git LFS pointer, not the checkpoint: fetch the file (git lfs pull)."
    if text[:15].lower().startswith((b"<!doctype html", b"<html")):
        return (
            f"{name} is an HTML page (a failed or interrupted download?), not a PyTorch "
            "checkpoint: download the file again."
        )
    start = head[:16]
    looks = "a text file" if start.isascii() and start.decode().isprintable() else "binary data"
    return (
        f"{name} is not a PyTorch checkpoint: it is neither a zip file (torch.save) nor a pickle "
        f"(it is {looks} starting with {start!r}). Pass the .pth/.pt file written by torch.save."
    )


def _short_reason(e: BaseException) -> str:
    """The useful part of a torch.load error, without torch's advice (which may suggest an
    unsafe load)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line]
    reason = lines[0] if lines else type(e).__name__
    reason = reason.split(". ", 1)[0].rstrip(".")
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    return reason


def load_torch_file(path: str) -> Any:
    """Read a PyTorch `.pth`/`.pt`/`.ckpt` with `torch.load(weights_only=True)`.

    Only tensors, containers and primitive values are accepted: a pickle that would run code is
    refused. Raises ConversionError with what to do for a missing, empty, truncated or
    non-PyTorch file or an unsafe pickle; TorchMissingError (an ImportError too) if torch (the
    `convert` extra) is not installed.
    """
    name = repr(os.path.basename(path) or path)
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file {path!r} does not exist.")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ConversionError(f"{name} is empty (0 bytes): copy or download the checkpoint again.")
    if head.startswith(_ZIP_MAGIC):
        kind = "zip"
    elif head.startswith(_PICKLE_MAGIC):
        kind = "pickle"
    else:
        raise ConversionError(_not_a_checkpoint(name, head))
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TorchMissingError(
            "converting PyTorch checkpoints needs torch: pip install -e '.[convert]'"
        ) from e
    try:
        with warnings.catch_warnings():  # torch's advice on odd pickles; the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _short_reason(e)
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Unsupported global" in reason:
            what = f"calls {found.group(1)}" if found else "needs more than tensors"
            raise ConversionError(
                f"{name} is refused: its pickle {what}, which is not a tensor or container, and "
                "diffpure_jax never runs code from a checkpoint. Re-save just the weights, e.g. "
                "torch.save(model.state_dict(), path), and convert that file."
            ) from e
        raise ConversionError(
            f"{name} cannot be read: it is a pickle but not one that torch.save wrote, or it is "
            f"damaged ({reason}). Pass the .pth/.pt file written by torch.save."
        ) from e
    except EOFError as e:
        raise ConversionError(
            f"{name} is truncated: its data ends early. Copy or download the checkpoint again."
        ) from e
    except (RuntimeError, zipfile.BadZipFile) as e:
        if kind == "pickle" and "unexpected EOF" in str(e):  # legacy format, tensor data cut
            raise ConversionError(
                f"{name} is truncated: its data ends early ({_short_reason(e)}). Copy or "
                "download the checkpoint again."
            ) from e
        if kind == "zip" and "central directory" in str(e):
            raise ConversionError(
                f"{name} is truncated or damaged: it starts like a torch.save zip file but its "
                "end (the zip directory) is missing. Copy or download the checkpoint again."
            ) from e
        raise ConversionError(
            f"{name} is damaged or not a PyTorch checkpoint (torch.load: {_short_reason(e)}). "
            "Copy or download it again."
        ) from e
    except Exception as e:  # any other parse failure of a corrupted file
        raise ConversionError(
            f"{name} is damaged or not a PyTorch checkpoint ({type(e).__name__}: "
            f"{_short_reason(e)}). Copy or download it again."
        ) from e


def check_out_dir(out_dir: str) -> None:
    """Refuse, before any work, an output directory that is a file or already holds a
    checkpoint."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"output directory {out_dir!r} is a file; choose another one.")
    if os.path.exists(os.path.join(out_dir, VARIABLES_DIR)):
        raise ConversionError(
            f"{out_dir!r} already holds a checkpoint; remove it or choose another output directory."
        )


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


_SHOWN = 3  # keys of each kind named in a mismatch message (misshaped: 2, they are longer)


def _natural(key: str) -> list:
    """Sort key that puts 'all_modules.2' before 'all_modules.10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _some(items: list[str], sep: str = ", ", n: int = _SHOWN) -> str:
    shown = sep.join(items[:n])
    return f"{shown}{sep}..." if len(items) > n else shown


def format_arch(values: Mapping[str, Any], sep: str = ", ") -> str:
    """{'nf': 16, 'ch_mult': [1, 2]} -> 'nf=16, ch_mult=[1,2]' (sep=' ' gives --arch syntax)."""
    return sep.join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in values.items())


def architecture_hint(
    found: Mapping[str, Any], used: Mapping[str, Any], options: Iterable[str] = ()
) -> str:
    """What to do when a file does not fit the architecture `used`, given the values `found` by
    reading the file's key names and shapes; `options` are the other options that change
    shapes."""
    differ = {k: v for k, v in found.items() if used.get(k) != v}
    if differ:
        return (
            f"The file's shapes give {format_arch(differ)}: pass --arch {format_arch(differ, ' ')}"
            " (or the same keyword arguments)."
        )
    options = list(options)
    if found and options:
        return (
            f"The file's sizes ({format_arch(found)}) fit; another option differs: "
            f"set it with --arch ({', '.join(options)})."
        )
    if found:
        return (
            f"The file's sizes ({format_arch(found)}) fit, yet the keys differ: "
            "is this the right checkpoint kind?"
        )
    return "No size could be read from the file's keys: is this the right checkpoint kind?"


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
    hint: str = "Check that the file and the architecture options (depth, width, nf, ...) belong"
    " together.",
) -> None:
    """Raise KeyMismatchError counting the missing, unused and misshaped keys, naming the first
    few of each and ending with `hint` on a second line (the error holds the full lists)."""
    ignore = set(ignore)
    got = {k: tuple(v) for k, v in got.items() if k not in ignore}
    missing = sorted(set(expected) - set(got), key=_natural)
    extra = sorted(set(got) - set(expected), key=_natural)
    misshaped = {
        k: (tuple(expected[k]), got[k])
        for k in sorted(set(expected) & set(got), key=_natural)
        if tuple(expected[k]) != got[k]
    }
    if missing or extra or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_some(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys ({_some(extra)})")
        if misshaped:
            shapes = [f"{k}: expected {e}, got {g}" for k, (e, g) in misshaped.items()]
            parts.append(f"{len(misshaped)} misshaped keys ({_some(shapes, '; ', _SHOWN - 1)})")
        raise KeyMismatchError(
            f"the {what} does not match the architecture: {'; '.join(parts)}.\n{hint}",
            missing,
            extra,
            misshaped,
        )


def model_template(
    build: Callable[[], Any], kwargs: Mapping[str, Any], shown: Mapping[str, Any] | None = None
) -> Any:
    """`build()` (a jax.eval_shape of the model's init); a model that refuses its options (e.g.
    a depth that is not 6n+4) becomes a ConversionError naming the options `shown` (default: all
    of `kwargs`)."""
    try:
        return build()
    except (
        ValueError,
        TypeError,
        NotImplementedError,
        AssertionError,
        ArithmeticError,
        LookupError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        options = format_arch(shown or kwargs)
        raise ConversionError(
            f"the architecture options {options} do not make a model ({reason}); fix them with "
            "--arch KEY=VALUE."
        ) from e


def with_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any], what: str) -> dict:
    """`defaults` with `overrides`, tuples as lists (config.json values); an option `defaults`
    does not have is a ConversionError naming the known ones (`what`: e.g. 'NCSN++')."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ConversionError(
            f"unknown {what} option(s) {sorted(unknown)}; known: {', '.join(defaults)}"
        )
    kwargs = {**defaults, **overrides}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def score_template(
    module_cls: Any, kwargs: Mapping[str, Any], channels: int, time_dtype, shown=None
) -> Any:
    """The abstract variables of the score network `module_cls(**kwargs)` (kwargs hold its
    `image_size`) for (1, S, S, channels) images and a (1,) time of `time_dtype`; options that
    make no model fail as a ConversionError naming `shown` (default: all kwargs)."""
    import jax
    import jax.numpy as jnp

    def build():
        size = kwargs["image_size"]
        return jax.eval_shape(
            module_cls(**kwargs).init,
            jax.random.key(0),
            jnp.zeros((1, size, size, channels)),
            jnp.zeros((1,), time_dtype),
        )

    return model_template(build, kwargs, shown)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables: Any,
    rule: Callable[[tuple[str, ...], int], Rule] = default_rule,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
    hint: str | None = None,
) -> Any:
    """Map a numpy state_dict onto the structure of `abstract_variables` (Flax variables tree).

    Every key of `state_dict` not in `ignore` must be used, and every leaf must be present with
    the right shape; otherwise KeyMismatchError (a ConversionError) counts them, names the first
    few and ends with `hint` (what to do).
    """
    expected = expected_torch_shapes(abstract_variables, rule)
    shapes = {k: np.shape(v) for k, v in state_dict.items()}
    if hint is None:
        check_keys(expected, shapes, ignore, what)
    else:
        check_keys(expected, shapes, ignore, what, hint)
    flat = traverse_util.flatten_dict(abstract_variables)
    out = {}
    for path, leaf in flat.items():
        r = rule(path, len(leaf.shape))
        out[path] = np.asarray(r.layout(np.asarray(state_dict[r.torch_key])), dtype=leaf.dtype)
    return traverse_util.unflatten_dict(out)
