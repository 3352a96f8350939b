"""Flax port of the torchvision Bottleneck ResNets that DiffPure uses on ImageNet.

`ResNet()` is torchvision `resnet50()` (ResNet v1.5: the stride sits on the 3x3 conv);
`ResNet(width_per_group=128)` is `wide_resnet50_2()`. With `normalize` (the default) the input is
first mapped by DiffPure's `_Wrapper_ResNet` normalisation (`imagenet.normalize_imagenet`).

Submodules carry the PyTorch state_dict names ('conv1', 'layer1.0.conv2', 'layer1.0.downsample.0',
'fc', ...), so `convert.common.default_rule` maps torchvision checkpoints onto them. BatchNorm
running statistics live in the 'batch_stats' collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .imagenet import normalize_imagenet
from .wideresnet import _batch_norm, _conv

EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION
_PAD_NONE = ((0, 0), (0, 0))
_PAD_1 = ((1, 1), (1, 1))
_PAD_3 = ((3, 3), (3, 3))


class Bottleneck(nn.Module):
    """torchvision `Bottleneck`: 1x1 (in -> width), 3x3 stride s (width -> width), 1x1
    (width -> planes * 4), each with BatchNorm, ReLU after the sum with the shortcut.
    `downsample` (1x1 stride s conv + BN, named 'downsample.0' / 'downsample.1') replaces the
    identity shortcut. (B, H, W, in) -> (B, H/s, W/s, planes * 4)."""

    planes: int
    width: int
    stride: int
    downsample: bool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = nn.relu(_batch_norm("bn1", train)(_conv("conv1", self.width, 1, 1, _PAD_NONE)(x)))
        out = _conv("conv2", self.width, 3, self.stride, _PAD_1)(out)
        out = nn.relu(_batch_norm("bn2", train)(out))
        out = _conv("conv3", self.planes * EXPANSION, 1, 1, _PAD_NONE)(out)
        out = _batch_norm("bn3", train)(out)
        identity = x
        if self.downsample:
            identity = _conv("downsample.0", self.planes * EXPANSION, 1, self.stride, _PAD_NONE)(x)
            identity = _batch_norm("downsample.1", train)(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision `ResNet(Bottleneck, layers)` with ImageNet normalisation inside.

    layers: blocks per stage ([3, 4, 6, 3] for ResNet-50); planes: the 4 stage base widths
    (stage output = planes * 4); width_per_group: 64, or 128 for WRN-50-2 (3x3 conv width =
    planes * width_per_group / 64); stem_channels: the 7x7 stem conv's channels. image_size is
    the input size the checkpoint is for (config.json's input_shape; the network itself takes
    any size, ending in a global average pool).

    __call__(x, train=False): x (B, H, W, 3) float32 in [0, 1] (224x224 for ImageNet) ->
    logits (B, num_classes). `train=True` uses batch statistics (pass mutable=['batch_stats']).
    """

    layers: Sequence[int] = (3, 4, 6, 3)
    planes: Sequence[int] = (64, 128, 256, 512)
    width_per_group: int = 64
    stem_channels: int = 64
    num_classes: int = 1000
    image_size: int = 224
    normalize: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.layers) != 4 or len(self.planes) != 4:
            raise ValueError(
                f"ResNet needs 4 stages, got layers={list(self.layers)}, planes={list(self.planes)}"
            )
        if self.normalize:
            x = normalize_imagenet(x)
        x = _conv("conv1", self.stem_channels, 7, 2, _PAD_3)(x)
        x = nn.relu(_batch_norm("bn1", train)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD_1)  # pads with -inf, as torch
        in_planes = self.stem_channels
        for stage, (n, planes) in enumerate(zip(self.layers, self.planes, strict=True)):
            width = int(planes * (self.width_per_group / 64.0))
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                x = Bottleneck(
                    planes,
                    width,
                    stride,
                    downsample=stride != 1 or in_planes != planes * EXPANSION,
                    name=f"layer{stage + 1}.{i}",
                )(x, train)
                in_planes = planes * EXPANSION
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        return nn.Dense(self.num_classes, name="fc")(x)
