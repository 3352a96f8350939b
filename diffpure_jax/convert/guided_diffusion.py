"""Convert openai/guided-diffusion's ImageNet UNet (`256x256_diffusion_uncond.pt`) to Flax.

The file is a plain state_dict {name: float32 tensor} (a 'module.' prefix is stripped). Its keys
map onto `models.guided_unet.GuidedUNet` by `convert.common.default_rule`; only the attention's
Conv1d weights ('qkv', 'proj_out', shape (out, in, 1)) lose their last axis to become Dense
kernels. The full-size defaults are `ADM_IMAGENET256` (DiffPure's configs/imagenet.yml).

The sizes in_channels, model_channels, out_channels, num_res_blocks, channel_mult, the attention
levels (attention_resolutions as downsample rates), use_scale_shift_norm and resblock_updown can
be read from the file (`infer_architecture`); image_size and num_head_channels cannot (no shape
depends on them). The command line reads what it can (`infer=True`); explicit options win.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..checkpoint import save_variables
from ..models.guided_unet import ADM_IMAGENET256, GuidedUNet
from .common import (
    ConversionError,
    architecture_hint,
    check_keys,
    check_out_dir,
    convert_state_dict,
    expected_torch_shapes,
    load_torch_file,
    score_template,
    strip_prefix,
    to_numpy_state_dict,
    with_overrides,
)

SDE = {"beta_min": 0.1, "beta_max": 20.0, "n_discrete": 1000}
# The attention's 1x1 Conv1d weights (out, in, 1); Dense kernels in Flax.
_CONV1D = re.compile(r"\.(qkv|proj_out)\.weight$")
# Options that change no shape (so cannot be read from a file) but may still be wrong.
_UNREAD = ("num_head_channels",)


def architecture(**overrides: Any) -> dict:
    """GuidedUNet kwargs: the full ImageNet 256x256 config with `overrides`."""
    return with_overrides(ADM_IMAGENET256, overrides, "guided-diffusion")


def abstract_variables(kwargs: dict, shown: dict | None = None):
    """The Flax variables tree of GuidedUNet(**kwargs), shapes only; options that make no model
    fail as a ConversionError naming `shown` (default: all kwargs)."""
    return score_template(GuidedUNet, kwargs, kwargs["in_channels"], jnp.int32, shown)


def _torch_shapes(abstract: Any) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} of a template, with the Conv1d weights' trailing axis."""
    shapes = expected_torch_shapes(abstract)
    return {k: (*s, 1) if _CONV1D.search(k) else s for k, s in shapes.items()}


def expected_torch_keys(**overrides: Any) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of the official model, from the Flax template."""
    return _torch_shapes(abstract_variables(architecture(**overrides)))


_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(getattr(state_dict.get(key), "shape", ()))


def infer_architecture(state_dict: Mapping[str, Any]) -> dict:
    """The GuidedUNet options that a bare state_dict's key names and shapes give.

    in_channels from the first conv, model_channels from time_embed.0 (4 mc, mc), out_channels
    from out.2; num_res_blocks from the first output block holding an upsampler (the blocks are
    num_res_blocks + 1 per level), then channel_mult from the residual blocks' widths, the
    attention levels (as downsample rates), use_scale_shift_norm (emb_layers width 2 out) and
    resblock_updown (residual or conv resamplers). Options it cannot read are left out.
    """
    out: dict[str, Any] = {}
    first = _shape(state_dict, "input_blocks.0.0.weight")
    if len(first) == 4:
        out["in_channels"] = int(first[1])
    embed = _shape(state_dict, "time_embed.0.weight")
    if len(embed) == 2:
        out["model_channels"] = mc = int(embed[1])
    head = _shape(state_dict, "out.2.weight")
    if len(head) == 4:
        out["out_channels"] = int(head[0])

    blocks: dict[tuple[str, int], dict[int, set[str]]] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            layers = blocks.setdefault((m.group(1), int(m.group(2))), {})
            layers.setdefault(int(m.group(3)), set()).add(m.group(4))
    n_out = 1 + max((i for kind, i in blocks if kind == "output_blocks"), default=-1)
    n_in = 1 + max((i for kind, i in blocks if kind == "input_blocks"), default=-1)

    def is_attention(layer: set[str]) -> bool:
        return "qkv.weight" in layer

    ups = [
        i
        for i in range(n_out)
        if any(
            j > 0 and not is_attention(p) for j, p in blocks.get(("output_blocks", i), {}).items()
        )
    ]
    if not ups:  # a single level has no upsampler: all output blocks form one level
        nrb = n_out - 1 if n_out >= 2 and n_in == n_out else None
    else:
        nrb = ups[0]
    if nrb is None or nrb < 1 or n_out % (nrb + 1) or n_in != n_out:
        return out
    n_levels = n_out // (nrb + 1)
    if ups != [(nrb + 1) * k + nrb for k in range(n_levels - 1)]:
        return out
    out["num_res_blocks"] = nrb

    mult, attention, scale_shift, updown = [], [], set(), set()
    for level in range(n_levels):
        start = 1 + level * (nrb + 1)
        for i in range(start, start + nrb):
            layers = blocks.get(("input_blocks", i), {})
            width = _shape(state_dict, f"input_blocks.{i}.0.out_layers.3.weight")
            emb = _shape(state_dict, f"input_blocks.{i}.0.emb_layers.1.weight")
            if len(width) != 4 or len(emb) != 2:
                return out
            scale_shift.add(emb[0] == 2 * width[0])
            if i == start:
                mult.append(width[0])
                if is_attention(layers.get(1, set())):
                    attention.append(2**level)
        if level != n_levels - 1:
            down = blocks.get(("input_blocks", start + nrb), {}).get(0, set())
            updown.add("in_layers.2.weight" in down if down else None)
    if "model_channels" in out and all(w % mc == 0 for w in mult):
        out["channel_mult"] = [int(w // mc) for w in mult]
    out["attention_resolutions"] = attention
    if len(scale_shift) == 1:
        out["use_scale_shift_norm"] = bool(scale_shift.pop())
    if len(updown) == 1 and None not in updown:
        out["resblock_updown"] = bool(updown.pop())
    return out


def guided_diffusion_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """The numpy state_dict from a loaded `256x256_diffusion_uncond.pt` object (a plain
    state_dict; a 'module.' prefix is stripped)."""
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(hasattr(v, "shape") for v in obj.values())
    ):
        if isinstance(obj, Mapping):
            got = f"a dict with keys {list(obj)[:5]}"
        else:
            got = f"a {type(obj).__name__}"
        raise ConversionError(
            f"not a guided-diffusion state_dict: expected a plain {{name: tensor}} dict like "
            f"256x256_diffusion_uncond.pt, got {got}. Save model.state_dict() and convert that."
        )
    return to_numpy_state_dict(strip_prefix(obj, "module."))


def convert_guided_diffusion(src: str, out_dir: str, infer: bool = False, **overrides: Any) -> dict:
    """Convert `src` (256x256_diffusion_uncond.pt) into a diffpure_jax checkpoint at `out_dir`.

    `overrides` change the architecture (e.g. model_channels=32, ... for the small test model).
    With `infer`, the options not given in `overrides` that the file's shapes give are read
    from it (`infer_architecture`) and listed in the config's source.inferred. Returns the saved
    config.
    """
    architecture(**overrides)  # unknown options fail before the file is read
    check_out_dir(out_dir)
    state_dict = guided_diffusion_state_dict(load_torch_file(src))
    found = infer_architecture(state_dict)
    inferred = {k: v for k, v in found.items() if k not in overrides} if infer else {}
    kwargs = architecture(**inferred, **overrides)
    template = abstract_variables(kwargs, shown={**inferred, **overrides})
    what = f"checkpoint {os.path.basename(src)!r}"
    hint = architecture_hint(found, kwargs, _UNREAD)
    # Check against the PyTorch shapes (Conv1d weights 3-d), then drop the Conv1d axis.
    check_keys(_torch_shapes(template), {k: v.shape for k, v in state_dict.items()}, (), what, hint)
    state_dict = {k: v[..., 0] if _CONV1D.search(k) else v for k, v in state_dict.items()}
    variables = convert_state_dict(state_dict, template, what=what, hint=hint)
    size = kwargs["image_size"]
    config = {
        "kind": "score",
        "architecture": "guided_unet",
        "kwargs": kwargs,
        "input_shape": [size, size, kwargs["in_channels"]],
        "parameterization": "guided_diffusion",
        "sde": SDE,
        "source": {"file": os.path.basename(src), "inferred": inferred},
    }
    save_variables(out_dir, variables, config)
    return config
