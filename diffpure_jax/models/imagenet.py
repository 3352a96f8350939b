"""The ImageNet input normalisation of DiffPure's `_Wrapper_ResNet`, shared by the ImageNet
classifier ports (`resnet.ResNet`, `vit.VisionTransformer`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_imagenet(x: jax.Array) -> jax.Array:
    """(x - mean) / std per channel, in the order DiffPure computes it (float32).

    x: (B, H, W, 3) in [0, 1] -> (B, H, W, 3), roughly in [-2.1, 2.7].
    """
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std
