"""Flax port of timm 0.5.4's `VisionTransformer`, as DiffPure's DeiT-S uses it.

`VisionTransformer()` is facebookresearch/deit `deit_small_patch16_224` (patch 16, embed 384,
depth 12, 6 heads, qkv bias, MLP ratio 4, LayerNorm eps 1e-6, a class token, no distillation
token). With `normalize` (the default) the input is first mapped by DiffPure's `_Wrapper_ResNet`
normalisation (`imagenet.normalize_imagenet`).

Submodules and parameters carry the timm state_dict names ('patch_embed.proj', 'cls_token',
'pos_embed', 'blocks.0.attn.qkv', 'blocks.0.mlp.fc1', 'norm', 'head', ...), so
`convert.common.default_rule` maps the checkpoints onto them. Dropout and drop-path are 0, as
in evaluation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv_general_dilated
from .imagenet import normalize_imagenet

LN_EPS = 1e-6


def _layer_norm(name: str) -> nn.LayerNorm:
    """torch LayerNorm(eps=1e-6): the variance as mean((x - mean)^2), not E[x^2] - mean^2."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """timm `Attention`: softmax(q k^T * head_dim**-0.5) v over `num_heads` heads, then `proj`.
    (B, N, D) -> (B, N, D)."""

    dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = jnp.moveaxis(qkv, 2, 0)  # each (B, N, heads, head_dim)
        attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        attn = jax.nn.softmax(attn, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return nn.Dense(d, name="proj")(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with an exact
    (erf) GELU MLP of hidden width int(dim * mlp_ratio). (B, N, D) -> (B, N, D)."""

    dim: int
    num_heads: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.dim, self.num_heads, name="attn")(_layer_norm("norm1")(x))
        h = nn.Dense(int(self.dim * self.mlp_ratio), name="mlp.fc1")(_layer_norm("norm2")(x))
        h = nn.Dense(self.dim, name="mlp.fc2")(nn.gelu(h, approximate=False))
        return x + h


class VisionTransformer(nn.Module):
    """timm 0.5.4 `VisionTransformer` (class token, qkv bias, LayerNorm eps 1e-6) with ImageNet
    normalisation inside; defaults are DeiT-S/16 at 224x224.

    __call__(x, train=False): x (B, img_size, img_size, 3) float32 in [0, 1] -> logits
    (B, num_classes), from the final-norm class token. `train` is accepted for the common
    classifier signature; it changes nothing (no dropout, no BatchNorm).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    normalize: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.img_size % self.patch_size or self.embed_dim % self.num_heads:
            raise ValueError(
                f"VisionTransformer needs img_size divisible by patch_size and embed_dim by "
                f"num_heads, got {self.img_size}, {self.patch_size}, {self.embed_dim}, "
                f"{self.num_heads}"
            )
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"VisionTransformer(img_size={self.img_size}) takes "
                f"{self.img_size}x{self.img_size} images, got {x.shape[1]}x{x.shape[2]}"
            )
        if self.normalize:
            x = normalize_imagenet(x)
        p, d = self.patch_size, self.embed_dim
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            name="patch_embed.proj",
            conv_general_dilated=conv_general_dilated,
        )(x)
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # (B, N, D), patches in row-major order as torch's flatten(2)
        n_patches = x.shape[1]
        init = nn.initializers.normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, d))
        pos_embed = self.param("pos_embed", init, (1, n_patches + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)), x], axis=1) + pos_embed
        for i in range(self.depth):
            x = Block(d, self.num_heads, self.mlp_ratio, name=f"blocks.{i}")(x)
        x = _layer_norm("norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])
