"""Convert the official classifier checkpoints (PyTorch) that DiffPure uses to Flax.

Variants (how DiffPure / RobustBench / torchvision / torch.hub load each file):

* 'robustbench-wrn': RobustBench 'Standard' WRN-28-10 (`cifar10-wideresnet-28-10`);
  `ckpt['state_dict']` if present, else `ckpt`; 'module.' and 'model.' prefixes removed.
* 'diffpure-wrn-dropout': DiffPure WRN-70-16 with dropout 0.3 (`cifar10-wrn-70-16-dropout`);
  a plain state_dict with a 'module.' prefix.
* 'robustbench-dm-wrn': RobustBench DMWideResNet-70-16 (`cifar10-wideresnet-70-16`);
  `ckpt['model_state_dict']` with a 'module.0.' prefix.
* 'torchvision-resnet50': torchvision `resnet50()` (`imagenet-resnet50`); a plain state_dict
  (old files lack `num_batches_tracked`, which is ignored anyway).
* 'torchvision-wide-resnet50-2': torchvision `wide_resnet50_2()` (`imagenet-wideresnet-50-2`);
  a plain state_dict.
* 'deit-s': facebookresearch/deit `deit_small_patch16_224` (`imagenet-deit-s`), a timm 0.5.4
  ViT; `ckpt['model']`.
* 'celebahq-attribute': a gan-ensembling CelebA-HQ attribute classifier (`celebahq__<Attr>`,
  `pretrained/celebahq/<Attr>/net_best.pth`); `ckpt['state_dict']` of its
  {'state_dict', 'optimizer', 'epoch', 'valacc'} (the `lod_in` buffer is ignored).

The CIFAR models take 32x32 inputs; the ImageNet ones 224x224 unless `image_size` (ResNets) or
`img_size` (ViT) says otherwise, and normalize with the ImageNet mean/std inside. The attribute
net takes `input_size` (256) and box-downsamples it to its `resolution`. The sizes can
be read from the file (`infer_architecture`: WRN depth, width, num_classes; ResNet layers,
planes, width_per_group, stem_channels, num_classes; ViT embed_dim, depth, patch_size, img_size,
mlp_ratio, num_classes; attribute net resolution, num_channels, fmap_base, fmap_max,
use_mbstd); the command line does so (`infer=True`), explicit options win.
drop_rate, normalize, a ResNet's image_size, a ViT's num_heads and the attribute net's
input_size are not stored in a file.
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

INPUT_SHAPE = (32, 32, 3)  # the CIFAR variants'; the ImageNet ones' comes from their kwargs
_IGNORE = ("*num_batches_tracked",)
_IMAGENET_RESNET50 = {
    "layers": [3, 4, 6, 3],
    "planes": [64, 128, 256, 512],
    "width_per_group": 64,
    "stem_channels": 64,
    "num_classes": 1000,
    "image_size": 224,
    "normalize": True,
}

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
    "torchvision-resnet50": ("resnet", _IMAGENET_RESNET50, _IGNORE),
    "torchvision-wide-resnet50-2": (
        "resnet",
        {**_IMAGENET_RESNET50, "width_per_group": 128},
        _IGNORE,
    ),
    "deit-s": (
        "vit",
        {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "mlp_ratio": 4.0,
            "num_classes": 1000,
            "normalize": True,
        },
        (),
    ),
    "celebahq-attribute": (
        "attribute_net",
        {
            "resolution": 256,
            "num_channels": 3,
            "fmap_base": 8192,
            "fmap_decay": 1.0,
            "fmap_max": 512,
            "use_mbstd": False,
            "input_size": 256,
        },
        ("lod_in",),  # blends progressive-growing inputs; unused with fixed_size=True
    ),
}
# architecture -> the kwarg giving the (square) input size; others take INPUT_SHAPE
_SIZE_OPTION = {"resnet": "image_size", "vit": "img_size", "attribute_net": "input_size"}


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
    elif variant == "robustbench-dm-wrn":
        if not isinstance(obj, Mapping) or "model_state_dict" not in obj:
            raise ConversionError(
                f"variant {variant!r} expects a dict with a 'model_state_dict' entry; the file "
                f"has {_top_level(obj)}."
            )
        sd = _require_state_dict(obj["model_state_dict"], variant, "ckpt['model_state_dict']")
        sd = strip_prefix(sd, "module.0.")
    elif variant == "deit-s":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
            raise ConversionError(
                f"variant {variant!r} expects a dict with a 'model' entry (the deit release's "
                f"{{'model': state_dict}}); the file has {_top_level(obj)}."
            )
        sd = _require_state_dict(obj["model"], variant, "ckpt['model']")
    elif variant == "celebahq-attribute":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
            raise ConversionError(
                f"variant {variant!r} expects gan-ensembling's dict with a 'state_dict' entry "
                f"(and 'optimizer', 'epoch', 'valacc'); the file has {_top_level(obj)}."
            )
        sd = _require_state_dict(obj["state_dict"], variant, "ckpt['state_dict']")
    else:  # torchvision: a plain state_dict, loaded as is
        sd = _require_state_dict(obj, variant, "the checkpoint")
    return to_numpy_state_dict(sd)


def _ignored(keys: Iterable[str], patterns: Iterable[str]) -> set[str]:
    patterns = tuple(patterns)
    return {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def input_shape(architecture: str, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """(H, W, C) of the images the classifier `architecture` with `kwargs` takes."""
    if architecture in _SIZE_OPTION:
        size = kwargs[_SIZE_OPTION[architecture]]
        return (size, size, kwargs.get("num_channels", 3))
    return INPUT_SHAPE


def _abstract_variables(architecture: str, kwargs: dict, shown: dict | None = None) -> Any:
    def build():
        module = models.build_model(architecture, kwargs)
        x = jax.ShapeDtypeStruct((1, *input_shape(architecture, kwargs)), jnp.float32)
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


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in getattr(state_dict.get(key), "shape", ()))


def _count(state_dict: Mapping[str, Any], block: str) -> int:
    """How many blocks `{block}.0`, `{block}.1`, ... the keys name."""
    pattern = re.compile(re.escape(block) + r"\.(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def _infer_resnet(state_dict: Mapping[str, Any]) -> dict:
    """torchvision ResNet: blocks per stage, planes (each stage's conv3 outputs / 4),
    width_per_group (layer1's 3x3 width * 64 / planes), stem channels, num_classes."""
    out: dict[str, Any] = {}
    layers = [_count(state_dict, f"layer{s}") for s in (1, 2, 3, 4)]
    if all(layers):
        out["layers"] = layers
    outs = [_shape(state_dict, f"layer{s}.0.conv3.weight") for s in (1, 2, 3, 4)]
    if all(len(o) == 4 and o[0] % 4 == 0 for o in outs):
        out["planes"] = [o[0] // 4 for o in outs]
        width = _shape(state_dict, "layer1.0.conv2.weight")
        if len(width) == 4 and (width[0] * 64) % out["planes"][0] == 0:
            out["width_per_group"] = width[0] * 64 // out["planes"][0]
    if len(stem := _shape(state_dict, "conv1.weight")) == 4:
        out["stem_channels"] = stem[0]
    if len(head := _shape(state_dict, "fc.weight")) == 2:
        out["num_classes"] = head[0]
    return out


def _infer_vit(state_dict: Mapping[str, Any]) -> dict:
    """timm ViT: embed_dim, depth, patch_size, img_size (from the number of position
    embeddings), mlp_ratio and num_classes; num_heads is not in the shapes."""
    out: dict[str, Any] = {}
    if len(patch := _shape(state_dict, "patch_embed.proj.weight")) == 4:
        out["embed_dim"], out["patch_size"] = patch[0], patch[2]
        if len(pos := _shape(state_dict, "pos_embed")) == 3:
            side = round((pos[1] - 1) ** 0.5)
            if side * side == pos[1] - 1:
                out["img_size"] = side * patch[2]
        hidden = _shape(state_dict, "blocks.0.mlp.fc1.weight")
        if len(hidden) == 2 and hidden[0] % patch[0] == 0:  # int(dim * ratio) stays exact
            out["mlp_ratio"] = float(hidden[0] // patch[0])
    if depth := _count(state_dict, "blocks"):
        out["depth"] = depth
    if len(head := _shape(state_dict, "head.weight")) == 2:
        out["num_classes"] = head[0]
    return out


def _attribute_resolution(state_dict: Mapping[str, Any]) -> int | None:
    """The official `max_res_from_state_dict`: R where '8x8.conv0', '16x16.conv0', ... up to
    'RxR.conv0.conv.weight' are present (4 with none, if the 4x4 head is there)."""
    side = 4
    while f"{2 * side}x{2 * side}.conv0.conv.weight" in state_dict:
        side *= 2
    return side if side > 4 or "4x4.conv.conv.weight" in state_dict else None


def _infer_attribute(state_dict: Mapping[str, Any]) -> dict:
    """Attribute net (progressive-GAN D): resolution from the 'RxR.conv0' keys, num_channels,
    use_mbstd, and fmap_base / fmap_max when one pair (with fmap_decay 1) gives every stage's
    feature maps."""
    out: dict[str, Any] = {}
    if (resolution := _attribute_resolution(state_dict)) is None:
        return out
    out["resolution"] = resolution
    log2 = resolution.bit_length() - 1
    if len(rgb := _shape(state_dict, "fromrgb_lod0.conv.conv.weight")) == 4:
        out["num_channels"] = rgb[1]
    head = _shape(state_dict, "4x4.conv.conv.weight")
    if len(head) == 4 and head[1] - head[0] in (0, 1):
        out["use_mbstd"] = head[1] == head[0] + 1
    # stage -> feature maps: fromrgb gives nf(log2 - 1), block 2^r's conv1 nf(r - 2), the head's
    # conv nf(1) and dense0 nf(0)
    keys = {log2 - 1: "fromrgb_lod0.conv.conv.weight", 1: "4x4.conv.conv.weight"}
    keys.update({r - 2: f"{2**r}x{2**r}.conv1.conv.weight" for r in range(3, log2 + 1)})
    keys[0] = "4x4.dense0.linear.weight"
    nf = {s: shape[0] for s, k in keys.items() if (shape := _shape(state_dict, k))}
    if len(nf) == log2:
        base, largest = nf[log2 - 1] * 2 ** (log2 - 1), max(nf.values())
        default_max = VARIANTS["celebahq-attribute"][1]["fmap_max"]
        for fmap_max in (default_max, largest):
            if all(min(base // 2**s, fmap_max) == n for s, n in nf.items()):
                out["fmap_base"], out["fmap_max"] = base, fmap_max
                break
    return out


def infer_architecture(variant: str, state_dict: Mapping[str, Any]) -> dict:
    """The sizes a bare state_dict's key names and shapes give for `variant`. WideResNets: depth
    (6n+4 with n blocks in each of the 3 groups), the width (the first block's channels / 16)
    and num_classes; ResNets and ViTs: see `_infer_resnet`, `_infer_vit`; the attribute net:
    `_infer_attribute`. Sizes it cannot read unambiguously are left out."""
    architecture = _variant(variant)[0]
    if architecture == "attribute_net":
        return _infer_attribute(state_dict)
    if architecture == "resnet":
        return _infer_resnet(state_dict)
    if architecture == "vit":
        return _infer_vit(state_dict)
    block, groups, first_conv, width_option, head = _LAYOUT[architecture]
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
        "input_shape": list(input_shape(architecture, kwargs)),
        "source": {"file": os.path.basename(src), "variant": variant},
    }
    if inferred:
        config["source"]["inferred"] = inferred
    save_variables(out_dir, variables, config)
    return config
