"""NCSN++ (score_sde's `ncsnpp.py`) in Flax, for the DDPM++ configurations DiffPure uses.

Supports what `vp/cifar10_ddpmpp_deep_continuous` needs: BigGAN residual blocks with naive
(nearest / average) resampling, skip rescaling by 1/sqrt(2), DDPM single-head attention with NIN
projections, positional (sinusoidal) time embedding, GroupNorm(min(C // 4, 32), eps=1e-6), swish.
Options that config does not use raise NotImplementedError.

Submodules are named 'all_modules.<i>' in the order of the PyTorch `all_modules` ModuleList, with
the PyTorch child names inside, so state_dict keys map onto the Flax tree one to one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv_general_dilated
from .norm import GroupNorm


def default_init(scale: float = 1.0):
    """score_sde's DDPM init: variance scaling, fan_avg, uniform; scale 0 means 1e-10."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def timestep_embedding(labels: jax.Array, dim: int, max_positions: int = 10_000) -> jax.Array:
    """score_sde's sinusoidal embedding: [sin, cos] with frequencies exp(-ln(1e4) i / (dim/2 - 1)).

    labels: (B,) float (999 t for the continuous VP model). Returns (B, dim).
    """
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    args = labels.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(channels: int, name: str) -> GroupNorm:
    return GroupNorm(num_groups=min(channels // 4, 32), epsilon=1e-6, name=name)


def conv(features: int, size: int, name: str, init_scale: float = 1.0) -> nn.Conv:
    pad = size // 2
    return nn.Conv(
        features,
        (size, size),
        padding=((pad, pad), (pad, pad)),
        kernel_init=default_init(init_scale),
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=default_init(), name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour (score_sde `naive_upsample_2d`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_mean(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C), 2x2 average (score_sde `naive_downsample_2d`)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class NIN(nn.Module):
    """1x1 projection with PyTorch-layout params W (in, out) and b (out,), over the last axis."""

    features: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x):
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.features))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        return jnp.einsum("...c,cd->...d", x, w) + b


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all pixels (score_sde `AttnBlockpp`)."""

    skip_rescale: bool = True
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(c, "GroupNorm_0")(x)
        q = NIN(c, name="NIN_0")(y)
        k = NIN(c, name="NIN_1")(y)
        v = NIN(c, name="NIN_2")(y)
        logits = jnp.einsum("bhwc,bijc->bhwij", q, k) * (c**-0.5)
        weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1).reshape(b, h, w, h, w)
        y = jnp.einsum("bhwij,bijc->bhwc", weights, v)
        y = NIN(c, init_scale=self.init_scale, name="NIN_3")(y)
        return (x + y) / math.sqrt(2.0) if self.skip_rescale else x + y


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block with optional 2x up/down resampling inside the block."""

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x, temb=None, train: bool = False):
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = nn.swish(group_norm(in_ch, "GroupNorm_0")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_mean(h), downsample_mean(x)
        h = conv(out_ch, 3, "Conv_0")(h)
        if temb is not None:
            h = h + dense(out_ch, "Dense_0")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(group_norm(out_ch, "GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(out_ch, 3, "Conv_1", init_scale=self.init_scale)(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv(out_ch, 1, "Conv_2")(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


_SUPPORTED = {
    "resblock_type": "biggan",
    "fir": False,
    "progressive": "none",
    "progressive_input": "none",
    "embedding_type": "positional",
    "attention_type": "ddpm",
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "scale_by_sigma": False,
    "conv_size": 3,
}


class NCSNpp(nn.Module):
    """NCSN++ noise-prediction network.

    Call: `model.apply(variables, x, labels, train=False)` with x (B, H, W, C) float32 in [-1, 1]
    (or [0, 1] when `centered=False`) and labels (B,) float (999 t for the continuous VP model).
    Returns (B, H, W, C): the predicted noise eps (score = -eps / std(t)).
    """

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: Sequence[int] = (16,)
    image_size: int = 32
    num_channels: int = 3
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    conditional: bool = True
    centered: bool = True
    resblock_type: str = "biggan"
    fir: bool = False
    progressive: str = "none"
    progressive_input: str = "none"
    embedding_type: str = "positional"
    attention_type: str = "ddpm"
    normalization: str = "GroupNorm"
    nonlinearity: str = "swish"
    scale_by_sigma: bool = False
    conv_size: int = 3

    def _check_supported(self):
        for option, supported in _SUPPORTED.items():
            value = getattr(self, option)
            if value != supported:
                raise NotImplementedError(
                    f"NCSNpp option {option}={value!r} is not ported; only the options of "
                    f"score_sde's cifar10_ddpmpp(_deep)_continuous are ({option}={supported!r})."
                )

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        self._check_supported()
        index = itertools.count()

        def name():
            return f"all_modules.{next(index)}"

        def resblock(**kw):
            return ResnetBlockBigGANpp(
                dropout=self.dropout,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                name=name(),
                **kw,
            )

        def attn():
            return AttnBlockpp(
                skip_rescale=self.skip_rescale, init_scale=self.init_scale, name=name()
            )

        nf, n_levels = self.nf, len(self.ch_mult)
        resolutions = [self.image_size // 2**i for i in range(n_levels)]

        temb = None
        if self.conditional:
            temb = timestep_embedding(labels, nf)
            temb = dense(4 * nf, name())(temb)
            temb = dense(4 * nf, name())(nn.swish(temb))

        if not self.centered:
            x = 2.0 * x - 1.0

        hs = [conv(nf, 3, name())(x)]
        for level in range(n_levels):
            for _ in range(self.num_res_blocks):
                h = resblock(out_ch=nf * self.ch_mult[level])(hs[-1], temb, train)
                if resolutions[level] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level != n_levels - 1:
                hs.append(resblock(down=True)(hs[-1], temb, train))

        h = hs[-1]
        h = resblock()(h, temb, train)
        h = attn()(h)
        h = resblock()(h, temb, train)

        for level in reversed(range(n_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resblock(out_ch=nf * self.ch_mult[level])(h, temb, train)
            if resolutions[level] in self.attn_resolutions:
                h = attn()(h)
            if level != 0:
                h = resblock(up=True)(h, temb, train)
        assert not hs

        h = nn.swish(group_norm(h.shape[-1], name())(h))
        return conv(self.num_channels, 3, name(), init_scale=self.init_scale)(h)


if TYPE_CHECKING:
    from ..score import ScoreModel


def tiny_ncsnpp_kwargs(image_size: int = 8, nf: int = 8, **overrides) -> dict:
    """NCSNpp kwargs of a tiny test network: `nf` base channels, ch_mult (1, 2), one residual
    block per resolution, attention at `image_size // 2`, init_scale 1 (so the output is O(1),
    unlike score_sde's init_scale 0), no dropout; `overrides` replace or add NCSNpp fields.

    Sequences are lists, so the dict can be stored as a checkpoint's config `kwargs` (JSON).
    """
    kwargs = {
        "nf": nf,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [image_size // 2],
        "image_size": image_size,
        "num_channels": 3,
        "init_scale": 1.0,
        "dropout": 0.0,
    }
    kwargs.update(overrides)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def tiny_score_model(
    image_size: int = 8,
    channels: int = 3,
    nf: int = 8,
    seed: int = 0,
    dtype=jnp.float32,
    **overrides,
) -> ScoreModel:
    """A `diffpure_jax.score.ScoreModel` on (image_size, image_size, channels) images: the NCSN++
    of `tiny_ncsnpp_kwargs(image_size, nf, num_channels=channels, **overrides)` with random weights
    from Flax's `init` at `jax.random.key(seed)`, cast to `dtype`, and the default VP-SDE with the
    continuous eps parameterization. For tests, self-checks and benchmarks; no checkpoint needed.
    """
    from ..score import ScoreModel, eps_continuous_score_fn
    from ..sde import VPSDE

    kwargs = tiny_ncsnpp_kwargs(image_size, nf, num_channels=channels, **overrides)
    model = NCSNpp(**kwargs)
    shape = (kwargs["image_size"], kwargs["image_size"], kwargs["num_channels"])
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *shape), dtype), jnp.zeros((1,)))
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
    sde = VPSDE()
    return ScoreModel(variables, eps_continuous_score_fn(model.apply, sde), sde, shape)
