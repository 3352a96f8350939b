"""Flax (linen) ports of the official networks, built by name from a checkpoint's config.

Every module takes NHWC float32 input. Submodules are named after their PyTorch counterparts
(dotted names such as 'all_modules.3' or 'block1.layer.0'), so `convert.common.default_rule` maps
PyTorch state_dict keys onto the Flax tree without per-model tables.
"""

from __future__ import annotations

import importlib

import flax.linen as nn

# architecture name (as stored in config.json) -> (module, class); imported on first use.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "ncsnpp": ("ncsnpp", "NCSNpp"),
    "wideresnet": ("wideresnet", "WideResNet"),
    "dm_wideresnet": ("wideresnet", "DMWideResNet"),
    "guided_unet": ("guided_unet", "GuidedUNet"),
    "resnet": ("resnet", "ResNet"),
    "vit": ("vit", "VisionTransformer"),
    "attribute_net": ("attribute_net", "AttributeNet"),
    "ddpm_unet": ("ddpm_unet", "DDPMUNet"),
}


def build_model(architecture: str, kwargs: dict) -> nn.Module:
    """The Flax module for an architecture name stored in a checkpoint's config.json."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(**kwargs)
