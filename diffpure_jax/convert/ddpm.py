"""Convert SDEdit's CelebA-HQ DDPM UNet (`celeba_hq.ckpt`) to Flax.

The file is a plain state_dict {name: float32 tensor} of SDEdit's `models/diffusion.py` `Model`
(= DiffPure `ddpm/unet_ddpm.py`; a 'module.' prefix is stripped). Its keys map onto
`models.ddpm_unet.DDPMUNet` by `convert.common.default_rule`. The full-size defaults are
`SDEDIT_CELEBAHQ256` (DiffPure's configs/celeba.yml); DiffPure samples it by DDPM ancestral steps
(linear betas 1e-4 to 0.02 over 1000 steps, fixedsmall variance), stored in the config's 'ddpm'.

The sizes in_channels, ch, out_ch, ch_mult, num_res_blocks and resamp_with_conv can be read from
the file (`infer_architecture`); image_size cannot (no shape depends on it), and the file only
says at which levels the attention blocks are, so attn_resolutions is read only when image_size
is given. The command line reads what it can (`infer=True`); explicit options win.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..checkpoint import save_variables
from ..models.ddpm_unet import SDEDIT_CELEBAHQ256, DDPMUNet
from .common import (
    ConversionError,
    architecture_hint,
    check_out_dir,
    convert_state_dict,
    expected_torch_shapes,
    format_arch,
    load_torch_file,
    score_template,
    strip_prefix,
    to_numpy_state_dict,
    with_overrides,
)

# SDEdit configs/celeba.yml's diffusion: what DiffPure's DDPM purification (runners/diffpure_ddpm)
# needs besides the network.
DDPM = {"beta_start": 0.0001, "beta_end": 0.02, "num_timesteps": 1000, "var_type": "fixedsmall"}


def architecture(**overrides: Any) -> dict:
    """DDPMUNet kwargs: the full CelebA-HQ 256x256 config with `overrides`."""
    return with_overrides(SDEDIT_CELEBAHQ256, overrides, "DDPM UNet")


def abstract_variables(kwargs: dict, shown: dict | None = None):
    """The Flax variables tree of DDPMUNet(**kwargs), shapes only; options that make no model
    fail as a ConversionError naming `shown` (default: all kwargs)."""
    return score_template(DDPMUNet, kwargs, kwargs["in_channels"], jnp.int32, shown)


def expected_torch_keys(**overrides: Any) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of the official model, from the Flax template."""
    return expected_torch_shapes(abstract_variables(architecture(**overrides)))


_DOWN_KEY = re.compile(r"^down\.(\d+)\.(block|attn)\.(\d+)\.")


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(getattr(state_dict.get(key), "shape", ()))


def attention_levels(state_dict: Mapping[str, Any]) -> list[int]:
    """The down-path levels (0 = full resolution) that hold attention blocks in a state_dict."""
    return sorted(
        {int(m.group(1)) for k in state_dict if (m := _DOWN_KEY.match(k)) and m[2] == "attn"}
    )


def infer_architecture(state_dict: Mapping[str, Any], image_size: int | None = None) -> dict:
    """The DDPMUNet options that a bare state_dict's key names and shapes give.

    in_channels and ch from conv_in (ch, in, 3, 3), out_ch from conv_out, num_res_blocks from
    the number of down.0 blocks, ch_mult from each level's first conv1 width / ch,
    resamp_with_conv from whether down.0.downsample.conv exists (with 2+ levels); with
    `image_size`, attn_resolutions from the levels holding attention (image_size / 2**level).
    Options it cannot read are left out.
    """
    out: dict[str, Any] = {}
    first = _shape(state_dict, "conv_in.weight")
    if len(first) == 4:
        out["in_channels"], out["ch"] = int(first[1]), int(first[0])
    head = _shape(state_dict, "conv_out.weight")
    if len(head) == 4:
        out["out_ch"] = int(head[0])
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        m = _DOWN_KEY.match(key)
        if m and m[2] == "block":
            blocks.setdefault(int(m[1]), set()).add(int(m[3]))
    n_levels = len(blocks)
    if not n_levels or set(blocks) != set(range(n_levels)):
        return out
    if blocks[0] == set(range(len(blocks[0]))):
        out["num_res_blocks"] = len(blocks[0])
    widths = [_shape(state_dict, f"down.{i}.block.0.conv1.weight") for i in range(n_levels)]
    if "ch" in out and all(len(w) == 4 and w[0] % out["ch"] == 0 for w in widths):
        out["ch_mult"] = [int(w[0] // out["ch"]) for w in widths]
    if n_levels > 1:
        out["resamp_with_conv"] = "down.0.downsample.conv.weight" in state_dict
    if image_size is not None:
        out["attn_resolutions"] = [image_size // 2**i for i in attention_levels(state_dict)]
    return out


def _hint(state_dict: Mapping[str, Any], found: dict, kwargs: dict) -> str:
    """What to do when the file does not fit `kwargs`: the sizes to pass, else where the file's
    attention blocks are."""
    differ = {k: v for k, v in found.items() if kwargs.get(k) != v}
    levels, size = attention_levels(state_dict), kwargs["image_size"]
    ours = [i for i in range(len(kwargs["ch_mult"])) if size // 2**i in kwargs["attn_resolutions"]]
    if differ or "attn_resolutions" in found or not levels or levels == ours:
        return architecture_hint(found, kwargs, ("image_size", "attn_resolutions"))
    at = ", ".join(f"image_size/{2**i}" if i else "image_size" for i in levels)
    return (
        f"The file's sizes ({format_arch(found)}) fit, but its attention blocks are at levels "
        f"{levels} (resolution {at}): pass --arch image_size=S, the training resolution "
        "(attn_resolutions is then read from the file)."
    )


def ddpm_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """The numpy state_dict from a loaded `celeba_hq.ckpt` object (a plain state_dict; a
    'module.' prefix is stripped)."""
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(hasattr(v, "shape") for v in obj.values())
    ):
        got = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, Mapping) else None
        got = got or f"a {type(obj).__name__}"
        raise ConversionError(
            f"not a DDPM UNet state_dict: expected a plain {{name: tensor}} dict like "
            f"celeba_hq.ckpt, got {got}. Save model.state_dict() and convert that."
        )
    return to_numpy_state_dict(strip_prefix(obj, "module."))


def convert_ddpm(src: str, out_dir: str, infer: bool = False, **overrides: Any) -> dict:
    """Convert `src` (celeba_hq.ckpt) into a diffpure_jax checkpoint at `out_dir`.

    `overrides` change the architecture (e.g. image_size=64, ch=32, ... for the small test
    model). With `infer`, the options not given in `overrides` that the file gives are read from
    it (`infer_architecture`) and listed in the config's source.inferred. Returns the saved
    config.
    """
    architecture(**overrides)  # unknown options fail before the file is read
    check_out_dir(out_dir)
    state_dict = ddpm_state_dict(load_torch_file(src))
    found = infer_architecture(state_dict, overrides.get("image_size"))
    inferred = {k: v for k, v in found.items() if k not in overrides} if infer else {}
    kwargs = architecture(**inferred, **overrides)
    template = abstract_variables(kwargs, shown={**inferred, **overrides})
    variables = convert_state_dict(
        state_dict,
        template,
        what=f"checkpoint {os.path.basename(src)!r}",
        hint=_hint(state_dict, found, kwargs),
    )
    size = kwargs["image_size"]
    config = {
        "kind": "score",
        "architecture": "ddpm_unet",
        "kwargs": kwargs,
        "input_shape": [size, size, kwargs["in_channels"]],
        "parameterization": "ddpm_eps",
        "ddpm": DDPM,
        "source": {"file": os.path.basename(src), "inferred": inferred},
    }
    save_variables(out_dir, variables, config)
    return config
