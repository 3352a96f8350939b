"""The guided-diffusion (ADM) UNet (openai/guided-diffusion `unet.py` `UNetModel`) in Flax.

DiffPure's ImageNet score network is the unconditional 256x256 model
(`256x256_diffusion_uncond.pt`, kwargs `ADM_IMAGENET256`): residual blocks with scale-shift
(FiLM) time conditioning, resampling inside residual blocks (nearest x2 / 2x2 average, no conv),
multi-head self-attention with the legacy QKV order at downsample rates 8, 16 and 32,
GroupNorm(32 groups, eps 1e-5) computed in float32, SiLU, sinusoidal timestep embedding [cos, sin].

`GuidedUNet.apply(variables, x, timesteps)`: x (B, H, W, in_channels) NHWC float32 in [-1, 1],
timesteps (B,) integer (or float) diffusion step in [0, 999] -> (B, H, W, out_channels): for the
learn_sigma models channels 0-2 are eps and 3-5 the variance interpolation values.
Inference only (dropout is a no-op, as in PyTorch eval mode).

Submodules carry the PyTorch state_dict names ('time_embed.0', 'input_blocks.1.0',
'in_layers.2', 'emb_layers.1', 'out_layers.3', 'skip_connection', 'norm', 'qkv', 'proj_out',
'middle_block.1', 'output_blocks.4.2', 'out.2', ...), so `convert.common.default_rule` maps the
official keys; the attention's 1x1 Conv1d layers are Dense here (the converter drops their
trailing kernel axis of size 1).

Mixed precision: the official model runs its torso in float16 with GroupNorm and the attention
softmax in float32. Under `score.with_score_dtype(..., 'bfloat16')` (params and the inputs of
every Dense/Conv cast to bfloat16) this port does the same in bfloat16: `GroupNorm32` is not a
flax GroupNorm, computes its statistics and normalisation in float32 and returns its input's
dtype, and the softmax runs in float32. (Unlike the official model, the time embedding and the
output head run in bfloat16 too, and GroupNorm's weights are rounded to bfloat16.)

Measured on the reference small model (CPU, jax 0.10.2, tests/test_guided_diffusion_parity.py,
relative = max |diff| / max |reference| over the 6 channels and the 4 timesteps):
* float32 vs the official float32 output: 1.6e-6 relative.
* bfloat16 vs float32: max abs 6.6e-2, max relative 2.3e-2 (mean abs 8.4e-3). The official
  float16 torso differs from float32 by 6.6e-3 abs, 2.3e-3 relative (`out_fp16_torso_cpu`);
  bfloat16 keeps 3 fewer mantissa bits (8x coarser). The same mechanism in float16 gives
  8.6e-3 abs, 2.9e-3 relative, close to the official gap. Keeping time_embed, emb_layers, the
  output head and the GroupNorm weights in float32 (the official split) would give 5.7e-2 abs in
  bfloat16; GroupNorm computed in bfloat16, 7.4e-2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv_general_dilated
from .norm import AffineGroupNorm

# openai/guided-diffusion 256x256_diffusion_uncond.pt as DiffPure builds it (configs/imagenet.yml):
# attention_resolutions '32,16,8' are the downsample rates 256 // res = 8, 16, 32.
ADM_IMAGENET256 = {
    "image_size": 256,
    "in_channels": 3,
    "model_channels": 256,
    "out_channels": 6,
    "num_res_blocks": 2,
    "attention_resolutions": [8, 16, 32],
    "channel_mult": [1, 1, 2, 2, 4, 4],
    "num_head_channels": 64,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "dropout": 0.0,
}


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """guided-diffusion's sinusoidal embedding [cos, sin], freqs exp(-ln(max_period) i / half).

    timesteps: (B,) integer or float steps. Returns (B, dim) float32 (zero-padded if dim is odd).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm32(AffineGroupNorm):
    """guided-diffusion's GroupNorm32: GroupNorm(32 groups, eps 1e-5) computed in float32.

    (B, ..., C) -> same shape, in the input's dtype; params 'scale' and 'bias' (C,). Deliberately
    not a `norm.GroupNorm`, so that mixed precision (score.LowPrecisionScoreFn) leaves its input
    and arithmetic in float32, as the official model's `super().forward(x.float()).type(x.dtype)`
    does.
    """

    num_groups: int = 32
    epsilon: float = 1e-5


def _conv(features: int, name: str, size: int = 3, stride: int = 1, zero: bool = False):
    """PyTorch Conv2d(k=size, stride, padding=size // 2) on NHWC; zero-initialised if `zero`."""
    pad = size // 2
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def upsample(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C), 2x2 average pool (stride 2)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv 'conv' (the resblock_updown=False upsampler)."""

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], "conv")(upsample(x))


class Downsample(nn.Module):
    """A stride-2 3x3 conv 'op' (the resblock_updown=False downsampler)."""

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], "op", stride=2)(x)


class ResBlock(nn.Module):
    """guided-diffusion `ResBlock`: (B, H, W, C) and emb (B, E) -> (B, H', W', out_channels).

    With `up`/`down` the map is resampled (nearest x2 / 2x2 average) after the first
    GroupNorm + SiLU, and so is the residual; the skip is the identity when the width is kept,
    else a 1x1 conv.
    """

    out_channels: int
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False

    @nn.compact
    def __call__(self, x, emb):
        channels, out = x.shape[-1], self.out_channels
        h = nn.silu(GroupNorm32(name="in_layers.0")(x))
        if self.up or self.down:
            resample = upsample if self.up else downsample
            h, x = resample(h), resample(x)
        h = _conv(out, "in_layers.2")(h)
        emb_out = nn.Dense(2 * out if self.use_scale_shift_norm else out, name="emb_layers.1")(
            nn.silu(emb)
        )
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(name="out_layers.0")(h) * (1 + scale) + shift
        else:
            h = GroupNorm32(name="out_layers.0")(h + emb_out)
        h = _conv(out, "out_layers.3", zero=True)(nn.silu(h))
        if out != channels:
            x = _conv(out, "skip_connection", size=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """guided-diffusion `AttentionBlock`, legacy head order: (B, H, W, C) -> (B, H, W, C).

    Self-attention over the H*W positions with C // num_head_channels heads; the qkv channels are
    grouped per head as [q, k, v] (QKVAttentionLegacy), q and k are each scaled by
    ch**-1/4, the softmax runs in float32.
    """

    num_head_channels: int = 64

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        if c % self.num_head_channels:
            raise ValueError(
                f"attention: {c} channels are not divisible by num_head_channels="
                f"{self.num_head_channels}"
            )
        heads, ch = c // self.num_head_channels, self.num_head_channels
        tokens = x.reshape(b, height * width, c)
        qkv = nn.Dense(3 * c, name="qkv")(GroupNorm32(name="norm")(tokens))
        qkv = qkv.reshape(b, height * width, heads, 3, ch)
        scale = 1 / math.sqrt(math.sqrt(ch))
        q, k, v = qkv[..., 0, :] * scale, qkv[..., 1, :] * scale, qkv[..., 2, :]
        weight = jnp.einsum("bthc,bshc->bhts", q, k)
        weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(weight.dtype)
        a = jnp.einsum("bhts,bshc->bthc", weight, v).reshape(b, height * width, c)
        h = nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(a)
        return (tokens + h).reshape(b, height, width, c)


class GuidedUNet(nn.Module):
    """guided-diffusion `UNetModel` (unconditional); defaults are `ADM_IMAGENET256`.

    `attention_resolutions` are downsample rates (ds = image_size // resolution: [8, 16, 32] for
    the official '32,16,8' at 256x256). `apply(variables, x, timesteps)`: x (B, H, W,
    in_channels) float32 in [-1, 1], H and W divisible by 2**(len(channel_mult) - 1), timesteps
    (B,) (or a scalar) step in [0, 999] -> (B, H, W, out_channels) in x's compute dtype.
    `image_size` only records the training size; `dropout` is inert (inference only).
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (8, 16, 32)
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, timesteps):
        levels, mc = len(self.channel_mult), self.model_channels
        factor = 2 ** (levels - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"GuidedUNet expects (B, H, W, C) with H, W divisible by {factor}, got {x.shape}"
            )
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), x.shape[:1])

        def resblock(out, name, **kw):
            return ResBlock(out, self.use_scale_shift_norm, name=name, **kw)

        def attention(name):
            return AttentionBlock(self.num_head_channels, name=name)

        emb = timestep_embedding(timesteps, mc)
        emb = nn.Dense(4 * mc, name="time_embed.0")(emb)
        emb = nn.Dense(4 * mc, name="time_embed.2")(nn.silu(emb))

        hs = [_conv(int(self.channel_mult[0] * mc), "input_blocks.0.0")(x)]
        block, ds = 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = resblock(int(mult * mc), f"input_blocks.{block}.0")(hs[-1], emb)
                if ds in self.attention_resolutions:
                    h = attention(f"input_blocks.{block}.1")(h)
                hs.append(h)
                block += 1
            if level != levels - 1:
                name = f"input_blocks.{block}.0"
                h = hs[-1]
                if self.resblock_updown:
                    hs.append(resblock(h.shape[-1], name, down=True)(h, emb))
                else:
                    hs.append(Downsample(name=name)(h))
                block += 1
                ds *= 2

        h = resblock(hs[-1].shape[-1], "middle_block.0")(hs[-1], emb)
        h = attention("middle_block.1")(h)
        h = resblock(h.shape[-1], "middle_block.2")(h, emb)

        block = 0
        for level in reversed(range(levels)):
            out = int(self.channel_mult[level] * mc)
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resblock(out, f"output_blocks.{block}.0")(h, emb)
                layer = 1
                if ds in self.attention_resolutions:
                    h = attention(f"output_blocks.{block}.1")(h)
                    layer = 2
                if level and i == self.num_res_blocks:
                    name = f"output_blocks.{block}.{layer}"
                    if self.resblock_updown:
                        h = resblock(out, name, up=True)(h, emb)
                    else:
                        h = Upsample(name=name)(h)
                    ds //= 2
                block += 1

        h = nn.silu(GroupNorm32(name="out.0")(h))
        return _conv(self.out_channels, "out.2", zero=True)(h)
