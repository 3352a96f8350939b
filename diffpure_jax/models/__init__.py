"""Flax (linen) ports of the official networks, built by name from a checkpoint's config.

Every module takes NHWC float32 input. Submodules are named after their PyTorch counterparts
(dotted names such as 'all_modules.3' or 'block1.layer.0'), so `convert.common.default_rule` maps
PyTorch state_dict keys onto the Flax tree without per-model tables.
"""

from __future__ import annotations

import flax.linen as nn


def build_model(architecture: str, kwargs: dict) -> nn.Module:
    """The Flax module for an architecture name stored in a checkpoint's config.json."""
    if architecture == "ncsnpp":
        from .ncsnpp import NCSNpp

        return NCSNpp(**kwargs)
    if architecture == "wideresnet":
        from .wideresnet import WideResNet

        return WideResNet(**kwargs)
    if architecture == "dm_wideresnet":
        from .wideresnet import DMWideResNet

        return DMWideResNet(**kwargs)
    raise ValueError(
        f"unknown architecture {architecture!r}; known: ncsnpp, wideresnet, dm_wideresnet"
    )
