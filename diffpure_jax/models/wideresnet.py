"""Flax ports of the CIFAR-10 WideResNet classifiers that DiffPure uses.

* `WideResNet`: the pre-activation WRN of RobustBench `wide_resnet.py` (the 'Standard' WRN-28-10,
  no input normalization) and of DiffPure `classifiers/cifar10_resnet.py` (WRN-70-16 with
  dropout 0.3, normalizing inside with the CIFAR-10 mean/std: `normalize=True`).
* `DMWideResNet`: RobustBench `dm_wide_resnet.py` (Swish, CIFAR-10 normalization inside, TF-SAME
  padding for the strided convolutions).

Both take NHWC float32 images in [0, 1] of shape (B, 32, 32, 3) and return logits
(B, num_classes). Submodules carry the PyTorch state_dict names ('block1', 'layer.0', 'bn1', ...),
so `convert.common.default_rule` maps the official checkpoints onto them. BatchNorm running
statistics live in the 'batch_stats' collection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv_general_dilated

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_PAD_SAME_1 = ((1, 1), (1, 1))  # PyTorch padding=1
_PAD_NONE = ((0, 0), (0, 0))
_PAD_TF_SAME_STRIDE_2 = ((0, 1), (0, 1))  # F.pad(x, (0, 1, 0, 1)): bottom/right only


def _normalize_cifar10(x: jax.Array) -> jax.Array:
    """(x - mean) / std per channel, in the order PyTorch computes it. x: (B, H, W, 3)."""
    mean = jnp.asarray(CIFAR10_MEAN, jnp.float32)
    std = jnp.asarray(CIFAR10_STD, jnp.float32)
    return (x - mean) / std


def _batch_norm(name: str, train: bool, momentum: float = 0.9) -> nn.BatchNorm:
    """PyTorch BatchNorm2d (eps 1e-5); Flax momentum = 1 - PyTorch momentum."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5, name=name)


def _conv(name: str, features: int, kernel: int, stride: int, padding) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=False,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def _global_avg_pool(x: jax.Array) -> jax.Array:
    """Global average pool: (B, H, W, C) -> (B, C).

    On the 8x8 map of a 32x32 CIFAR input this is the reference's F.avg_pool2d(x, 8); it also
    serves other sizes (7x7 for 28x28 Fashion-MNIST).
    """
    return jnp.mean(x, axis=(1, 2))


# --- RobustBench / DiffPure WideResNet ---------------------------------------------------------


class BasicBlock(nn.Module):
    """Pre-activation residual block (wide_resnet.py `BasicBlock`): (B,H,W,in) -> (B,H/s,W/s,out).

    When in != out the activated input also feeds the 1x1 `convShortcut`; otherwise the raw input
    is the residual. Dropout (rate `drop_rate`) sits between relu2 and conv2, in training only.
    """

    in_planes: int
    out_planes: int
    stride: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        equal_in_out = self.in_planes == self.out_planes
        if equal_in_out:
            out = nn.relu(_batch_norm("bn1", train)(x))
        else:
            x = nn.relu(_batch_norm("bn1", train)(x))
            out = x
        out = _conv("conv1", self.out_planes, 3, self.stride, _PAD_SAME_1)(out)
        out = nn.relu(_batch_norm("bn2", train)(out))
        if self.drop_rate > 0:
            out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
        out = _conv("conv2", self.out_planes, 3, 1, _PAD_SAME_1)(out)
        if equal_in_out:
            residual = x
        else:
            residual = _conv("convShortcut", self.out_planes, 1, self.stride, _PAD_NONE)(x)
        return residual + out


class BlockStack(nn.Module):
    """`n` residual blocks named `{prefix}.0`, `{prefix}.1`, ... (a PyTorch nn.Sequential); the
    first one changes width and stride. (B,H,W,in) -> (B,H/s,W/s,out)."""

    block: type[nn.Module]
    n: int
    in_planes: int
    out_planes: int
    stride: int
    prefix: str
    block_kwargs: tuple[tuple[str, float], ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.n):
            x = self.block(
                self.in_planes if i == 0 else self.out_planes,
                self.out_planes,
                self.stride if i == 0 else 1,
                **dict(self.block_kwargs),
                name=f"{self.prefix}.{i}",
            )(x, train)
        return x


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor` for CIFAR-10 (RobustBench / DiffPure `WideResNet`).

    Defaults are RobustBench's 'Standard' WRN-28-10 (no normalization). DiffPure's
    `cifar10-wrn-70-16-dropout` is `WideResNet(70, 16, drop_rate=0.3, normalize=True)`.

    __call__(x, train=False): x (B, H, W, C) float32 in [0, 1] (32x32x3 for CIFAR-10) ->
    logits (B, num_classes).
    With `normalize`, x is first mapped to (x - CIFAR10_MEAN) / CIFAR10_STD. `train=True` uses
    batch statistics (pass mutable=['batch_stats']) and, when drop_rate > 0, a 'dropout' rng.
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    drop_rate: float = 0.0
    normalize: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        channels = [16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
        if self.normalize:
            x = _normalize_cifar10(x)
        out = _conv("conv1", channels[0], 3, 1, _PAD_SAME_1)(x)
        for i, stride in enumerate((1, 2, 2)):
            drop = (("drop_rate", self.drop_rate),)
            out = BlockStack(
                BasicBlock,
                n,
                channels[i],
                channels[i + 1],
                stride,
                "layer",
                drop,
                name=f"block{i + 1}",
            )(out, train)
        out = nn.relu(_batch_norm("bn1", train)(out))
        out = _global_avg_pool(out)
        return nn.Dense(self.num_classes, name="fc")(out)


# --- RobustBench DMWideResNet ------------------------------------------------------------------


def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), RobustBench's `_Swish`."""
    return x * jax.nn.sigmoid(x)


class DMBlock(nn.Module):
    """`_Block` of dm_wide_resnet.py: pre-activation with Swish; conv_0 is padded explicitly,
    (1,1,1,1) for stride 1 and TF-SAME (bottom/right only) for stride 2.
    (B,H,W,in) -> (B,H/s,W/s,out)."""

    in_planes: int
    out_planes: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        has_shortcut = self.in_planes != self.out_planes
        if has_shortcut:
            x = swish(_batch_norm("batchnorm_0", train, momentum=0.99)(x))
            v = x
        else:
            v = swish(_batch_norm("batchnorm_0", train, momentum=0.99)(x))
        if self.stride == 1:
            pad = _PAD_SAME_1
        elif self.stride == 2:
            pad = _PAD_TF_SAME_STRIDE_2
        else:
            raise ValueError(f"unsupported stride {self.stride}")
        out = _conv("conv_0", self.out_planes, 3, self.stride, pad)(v)
        out = swish(_batch_norm("batchnorm_1", train, momentum=0.99)(out))
        out = _conv("conv_1", self.out_planes, 3, 1, _PAD_SAME_1)(out)
        if has_shortcut:
            residual = _conv("shortcut", self.out_planes, 1, self.stride, _PAD_NONE)(x)
        else:
            residual = x
        return residual + out


class DMWideResNet(nn.Module):
    """RobustBench `DMWideResNet(depth, width, activation_fn=Swish)` with CIFAR-10 normalization
    inside (DiffPure's `cifar10-wideresnet-70-16`). BatchNorm momentum is PyTorch's 0.01.

    __call__(x, train=False): x (B, H, W, C) float32 in [0, 1] (32x32x3 for CIFAR-10) ->
    logits (B, num_classes).
    """

    depth: int = 70
    width: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6 != 0:
            raise ValueError(f"DMWideResNet depth must be 6n+4, got {self.depth}")
        num_blocks = (self.depth - 4) // 6
        channels = [16, 16 * self.width, 32 * self.width, 64 * self.width]
        out = _normalize_cifar10(x)
        out = _conv("init_conv", channels[0], 3, 1, _PAD_SAME_1)(out)
        for i, stride in enumerate((1, 2, 2)):
            out = BlockStack(
                DMBlock,
                num_blocks,
                channels[i],
                channels[i + 1],
                stride,
                "block",
                name=f"layer.{i}",
            )(out, train)
        out = swish(_batch_norm("batchnorm", train, momentum=0.99)(out))
        out = _global_avg_pool(out)
        return nn.Dense(self.num_classes, name="logits")(out)
