"""Flax port of DiffPure's CelebA-HQ attribute classifier (`celebahq__<Attribute>`).

The network is DiffPure's `classifiers/attribute_net.py` `D` as `from_state_dict(...,
fixed_size=True, use_mbstd=False)` builds it: a progressive-GAN discriminator with equalized
learning rate (from chail/gan-ensembling). Every conv / linear weight is stored unscaled and its
output is multiplied at run time by wscale = gain / sqrt(fan_in) (gain sqrt(2); 1 for the last
dense) before the bias `b` is added. The wrapper around it is DiffPure's `ClassifierWrapper`:
x in [0, 1] -> (x - 0.5) / 0.5 -> `downsample` (a box average by the integer factor
input side / resolution; the identity when they are equal, as for the 256x256 release) -> D ->
logit (B, 1) -> logits = [logit, -logit].

Label convention (gan-ensembling trains with BCE(logit, 1 - label), CelebA's -1 read as 0):
column 0 (`logit`) is label 0, attribute absent; column 1 (`-logit`) is label 1, attribute
present, so softmax(logits)[:, 1] is DiffPure's `softmaxed`, the attribute's probability.

Submodules carry the PyTorch state_dict names ('fromrgb_lod0.conv.conv', '256x256.conv0.wscale',
'4x4.dense0.linear', ...): `convert.common.default_rule` maps the unscaled weights (conv OIHW ->
HWIO, linear (out, in) -> (in, out)) and the raw `b` params. The official `lod_in` buffer only
blends the progressive-growing inputs, which fixed_size=True never builds, so it is not ported.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .conv import conv_general_dilated

_GAIN = float(np.sqrt(2.0))
_SLOPE = 0.2  # LeakyReLU(0.2)


class WScaleLayer(nn.Module):
    """The equalized-LR output scale: x * gain / sqrt(fan_in) + b; x (B, H, W, C) or (B, C)."""

    features: int
    fan_in: int
    gain: float = _GAIN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = self.param("b", nn.initializers.normal(1.0), (self.features,))
        return x * float(self.gain / np.sqrt(self.fan_in)) + b


class WScaleConv2d(nn.Module):
    """Bias-free conv ('conv', weights N(0, 1)) then WScaleLayer ('wscale'); stride 1, padding
    `padding` on each side. (B, H, W, C_in) -> (B, H, W, features) for padding (k - 1) / 2."""

    features: int
    kernel_size: int
    padding: int = 0
    gain: float = _GAIN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p = self.kernel_size, self.padding
        y = nn.Conv(
            self.features,
            (k, k),
            padding=((p, p), (p, p)),
            use_bias=False,
            kernel_init=nn.initializers.normal(1.0),
            conv_general_dilated=conv_general_dilated,
            name="conv",
        )(x)
        return WScaleLayer(self.features, x.shape[-1] * k * k, self.gain, name="wscale")(y)


class WScaleLinear(nn.Module):
    """Bias-free linear ('linear', weights N(0, 1)) then WScaleLayer ('wscale'): (B, in) ->
    (B, features)."""

    features: int
    gain: float = _GAIN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(
            self.features,
            use_bias=False,
            kernel_init=nn.initializers.normal(1.0),
            name="linear",
        )(x)
        return WScaleLayer(self.features, x.shape[-1], self.gain, name="wscale")(y)


def _act(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, _SLOPE)


def _avg_pool(x: jax.Array, factor: int) -> jax.Array:
    """Box average over factor x factor blocks: (B, H, W, C) -> (B, H/f, W/f, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FromRGB(nn.Module):
    """act(WScaleConv2d 1x1) ('conv'): (B, H, W, C_img) -> (B, H, W, features)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _act(WScaleConv2d(self.features, 1, name="conv")(x))


class DownscaleConvBlock(nn.Module):
    """act(conv0 3x3) -> conv1 3x3 -> 2x2 average pool -> act (pool before the activation, as
    the official): (B, H, W, C) -> (B, H/2, W/2, conv1_features)."""

    conv0_features: int
    conv1_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _act(WScaleConv2d(self.conv0_features, 3, 1, name="conv0")(x))
        x = WScaleConv2d(self.conv1_features, 3, 1, name="conv1")(x)
        return _act(_avg_pool(x, 2))


def minibatch_stddev(x: jax.Array, group_size: int = 4) -> jax.Array:
    """progressive-GAN minibatch stddev: appends one channel holding, for each example, the mean
    over (C, H, W) of the stddev across its group (examples i, i + B/G, ...; G = min(group_size,
    B), B a multiple of G). (B, H, W, C) -> (B, H, W, C + 1)."""
    b, h, w, c = x.shape
    g = min(group_size, b)
    if b % g:
        raise ValueError(f"minibatch stddev needs a batch that is a multiple of {g}, got {b}")
    y = x.astype(jnp.float32).reshape(g, b // g, h, w, c)
    y = jnp.sqrt(jnp.mean(jnp.square(y - y.mean(axis=0)), axis=0) + 1e-8)
    y = jnp.tile(y.mean(axis=(1, 2, 3)), g).astype(x.dtype)  # example i gets group i % (B/G)
    return jnp.concatenate([x, jnp.broadcast_to(y[:, None, None, None], (b, h, w, 1))], -1)


class PredictionBlock(nn.Module):
    """The 4x4 head: [mbstd] -> act(conv 3x3) -> flatten in PyTorch's (C, 4, 4) order ->
    act(dense0) -> dense1 (gain 1): (B, 4, 4, C) -> (B, out_features)."""

    conv_features: int
    dense0_features: int
    out_features: int = 1
    use_mbstd: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_mbstd:
            x = minibatch_stddev(x)
        x = _act(WScaleConv2d(self.conv_features, 3, 1, name="conv")(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # NCHW flatten, as .view
        x = _act(WScaleLinear(self.dense0_features, name="dense0")(x))
        return WScaleLinear(self.out_features, gain=1.0, name="dense1")(x)


def downsample(x: jax.Array, size: int) -> jax.Array:
    """DiffPure's `downsample` to the net's resolution `size`: a box average by the integer
    factor H / size (the identity when H == size). (B, H, H, C) -> (B, size, size, C)."""
    h, w = x.shape[1:3]
    factor = h // size
    if h != w or factor < 1 or factor * size != h:
        raise ValueError(
            f"the attribute net takes square images whose side is a multiple of its resolution "
            f"{size}, got {h}x{w}"
        )
    return x if factor == 1 else _avg_pool(x, factor)


class AttributeNet(nn.Module):
    """DiffPure's CelebA-HQ attribute classifier: `ClassifierWrapper` around `D(fixed_size=True)`.

    resolution: the net's input side (256 for the release; a power of two >= 4). num_channels:
    image channels. Feature maps of stage s: min(int(fmap_base / 2 ** (s * fmap_decay)),
    fmap_max). use_mbstd: the minibatch-stddev channel in the 4x4 head (False for DiffPure's
    attribute classifiers). input_size: the image side the checkpoint is for (config.json's
    input_shape); inputs are box-downsampled to `resolution` by the integer factor
    side / resolution.

    __call__(x, train=False): x (B, H, H, num_channels) float32 in [0, 1] -> logits (B, 2) =
    [logit, -logit]; column 1 is the attribute present (label 1), column 0 absent. `train` is
    accepted for the common interface and changes nothing (no dropout or BatchNorm).
    """

    resolution: int = 256
    num_channels: int = 3
    fmap_base: int = 8192
    fmap_decay: float = 1.0
    fmap_max: int = 512
    use_mbstd: bool = False
    input_size: int = 256

    def nf(self, stage: int) -> int:
        """Feature maps of stage `stage` (the official `nf`)."""
        return min(int(self.fmap_base / (2.0 ** (stage * self.fmap_decay))), self.fmap_max)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        log2 = int(np.log2(self.resolution))
        if self.resolution < 4 or 2**log2 != self.resolution:
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        x = downsample((x - 0.5) / 0.5, self.resolution)
        x = FromRGB(self.nf(log2 - 1), name="fromrgb_lod0")(x)
        for res in range(log2, 2, -1):
            side = 2**res
            x = DownscaleConvBlock(self.nf(res - 1), self.nf(res - 2), name=f"{side}x{side}")(x)
        logit = PredictionBlock(self.nf(1), self.nf(0), 1, self.use_mbstd, name="4x4")(x)
        return jnp.concatenate([logit, -logit], axis=1)
