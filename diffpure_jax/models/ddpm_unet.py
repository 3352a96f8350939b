"""The DDPM UNet of SDEdit / DDIM (`models/diffusion.py` `Model`, = DiffPure `ddpm/unet_ddpm.py`).

DiffPure's CelebA-HQ score network is SDEdit's 256x256 model (`celeba_hq.ckpt`, kwargs
`SDEDIT_CELEBAHQ256`): residual blocks with an additive time embedding, single-head
self-attention at the `attn_resolutions`, 3x3 conv resamplers (nearest x2 / stride 2 after a
(0, 1) zero pad) or, without `resamp_with_conv`, nearest x2 / 2x2 average, GroupNorm(32 groups,
eps 1e-6), swish, and the sinusoidal timestep embedding [sin, cos] with frequencies
exp(-ln(1e4) i / (ch/2 - 1)).

`DDPMUNet.apply(variables, x, t)`: x (B, H, W, in_channels) NHWC float32 in [-1, 1], t (B,)
integer (or float) DDPM step in [0, 999] -> eps (B, H, W, out_ch). Dropout runs only with
`train=True` (0 in the official config).

Submodules carry the PyTorch state_dict names ('temb.dense.0', 'conv_in', 'down.1.block.0',
'norm1', 'temb_proj', 'nin_shortcut', 'down.2.attn.1', 'q', 'proj_out', 'down.0.downsample.conv',
'mid.block_1', 'mid.attn_1', 'up.3.block.2', 'up.3.upsample.conv', 'norm_out', 'conv_out'), so
`convert.common.default_rule` maps the official keys one to one. As in PyTorch, 'up.{i}' is the
level at resolution image_size / 2**i (the up path runs from the last index to 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv_general_dilated
from .norm import GroupNorm

# SDEdit configs/celeba.yml (= DiffPure configs/celeba.yml), the model of celeba_hq.ckpt.
SDEDIT_CELEBAHQ256 = {
    "image_size": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
    "resamp_with_conv": True,
}


def timestep_embedding(timesteps: jax.Array, dim: int) -> jax.Array:
    """DDPM's sinusoidal embedding [sin, cos], freqs exp(-ln(1e4) i / (dim/2 - 1)).

    timesteps: (B,) integer or float steps. Returns (B, dim) float32 (zero-padded if dim is odd).
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10_000) / (half - 1)))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def normalize(name: str) -> GroupNorm:
    """The model's GroupNorm: 32 groups, eps 1e-6, affine (params 'scale', 'bias')."""
    return GroupNorm(num_groups=32, epsilon=1e-6, name=name)


def conv(features: int, name: str, size: int = 3, stride: int = 1, pad=None) -> nn.Conv:
    """PyTorch Conv2d(k=size, stride, padding=size // 2 unless `pad` ((top, bottom), (l, r)))."""
    if pad is None:
        pad = ((size // 2, size // 2), (size // 2, size // 2))
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding=pad,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


class ResnetBlock(nn.Module):
    """(B, H, W, C) and temb (B, 4 ch) -> (B, H, W, out_ch): two GroupNorm-swish-conv3x3 layers,
    the projected time embedding added after the first; a 1x1 'nin_shortcut' when C != out_ch."""

    out_ch: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        h = conv(self.out_ch, "conv1")(nn.swish(normalize("norm1")(x)))
        h = h + nn.Dense(self.out_ch, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(normalize("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_ch, "conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, "nin_shortcut", size=1)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv q, k, v and proj_out, logits
    scaled by C**-0.5, residual: (B, H, W, C) -> (B, H, W, C)."""

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        h = normalize("norm")(x)
        q, k, v = (conv(c, name, size=1)(h).reshape(b, height * width, c) for name in "qkv")
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5), axis=-1)
        h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
        return x + conv(c, "proj_out", size=1)(h)


class Downsample(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, C): zero pad bottom/right by 1, conv3x3 stride 2 'conv'
    (with_conv) or a 2x2 average."""

    with_conv: bool = True

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return conv(x.shape[-1], "conv", stride=2, pad=((0, 1), (0, 1)))(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
    """(B, H, W, C) -> (B, 2H, 2W, C): nearest x2, then conv3x3 'conv' (with_conv)."""

    with_conv: bool = True

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], "conv")(x) if self.with_conv else x


class DDPMUNet(nn.Module):
    """The DDPM eps network; `apply(variables, x, t, train=False)`, shapes in the module doc."""

    image_size: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"DDPMUNet: expected {self.in_channels} channels, got {x.shape}")
        ch, n_levels, nrb = self.ch, len(self.ch_mult), self.num_res_blocks
        resolutions = [self.image_size // 2**i for i in range(n_levels)]

        def block(name: str, out_ch: int):
            return ResnetBlock(out_ch, self.dropout, name=name)

        temb = timestep_embedding(jnp.asarray(t), ch)
        temb = nn.Dense(4 * ch, name="temb.dense.0")(temb)
        temb = nn.Dense(4 * ch, name="temb.dense.1")(nn.swish(temb))

        hs = [conv(ch, "conv_in")(x)]
        for i in range(n_levels):
            for j in range(nrb):
                h = block(f"down.{i}.block.{j}", ch * self.ch_mult[i])(hs[-1], temb, train)
                if resolutions[i] in self.attn_resolutions:
                    h = AttnBlock(name=f"down.{i}.attn.{j}")(h)
                hs.append(h)
            if i != n_levels - 1:
                hs.append(Downsample(self.resamp_with_conv, name=f"down.{i}.downsample")(hs[-1]))

        h = block("mid.block_1", hs[-1].shape[-1])(hs[-1], temb, train)
        h = AttnBlock(name="mid.attn_1")(h)
        h = block("mid.block_2", h.shape[-1])(h, temb, train)

        for i in reversed(range(n_levels)):
            for j in range(nrb + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(f"up.{i}.block.{j}", ch * self.ch_mult[i])(h, temb, train)
                if resolutions[i] in self.attn_resolutions:
                    h = AttnBlock(name=f"up.{i}.attn.{j}")(h)
            if i != 0:
                h = Upsample(self.resamp_with_conv, name=f"up.{i}.upsample")(h)
        assert not hs

        h = nn.swish(normalize("norm_out")(h))
        return conv(self.out_ch, "conv_out")(h)
