"""Differentiable bilinear resizing as DiffPure's ImageNet path does it.

DiffPure resizes the 224 x 224 classifier input to the 256 x 256 of the guided-diffusion model
before purification and back afterwards, with `F.interpolate(mode='bilinear',
align_corners=False)` and no antialiasing. `resize_bilinear` is the same operation (half-pixel
centres, edge samples clamped), checked against the official outputs in
tests/test_imagenet_purify.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """x (B, H, W, C) -> (B, size[0], size[1], C), bilinear, align_corners=False, no antialias.

    Linear in x (so differentiable, its gradient the transposed interpolation); x's dtype.
    """
    h, w = size
    if tuple(x.shape[1:3]) == (h, w):
        return x
    out = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "linear", antialias=False)
    return out.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else out
