"""Score functions: a noise-prediction network behind the pure seam `score_fn(params, x, t)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp

from .models.norm import GroupNorm
from .sde import VPSDE

ScoreFn = Callable[[Any, Any, Any], Any]  # (params, x (B,H,W,C) in [-1,1], t (B,) or ()) -> score


def eps_continuous_score_fn(apply_fn: Callable, sde: VPSDE | None = None) -> ScoreFn:
    """score_sde's continuous VP parameterisation (CIFAR-10 NCSN++).

    The network gets the float label 999 t and predicts eps; score = -eps / std(t).
    `apply_fn(params, x, labels)` is the network; t may be a scalar or (B,).
    """

    sde = sde or VPSDE()

    def score_fn(params, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        eps = apply_fn(params, x, t * (sde.n_discrete - 1))
        return -eps / sde.std(t)[:, None, None, None]

    return score_fn


def guided_diffusion_timesteps(t, n_discrete: int = 1000):
    """The integer timestep DiffPure's guided-diffusion path feeds the network: floor(N t).

    Computed as the official `(t.float() * N).long()` (float32 product, truncated): t = 1 - 0.85
    in float32 is 0.14999998, which gives 149, not 150. t: () or (B,) in [0, 1] -> int32.
    """
    return jnp.floor(jnp.asarray(t, jnp.float32) * jnp.float32(n_discrete)).astype(jnp.int32)


def guided_diffusion_score_fn(apply_fn: Callable, sde: VPSDE | None = None) -> ScoreFn:
    """DiffPure's 'guided_diffusion' parameterisation (the ImageNet ADM, learned sigma).

    The network gets the integer timestep floor(1000 t) (`guided_diffusion_timesteps`) and
    returns 2C channels (eps, then the variance values); eps is the first C, and
    score = -eps / sqrt(1 - alpha_bar(t)) with the continuous alpha_bar of the VP-SDE (not the
    discrete one the network was trained on). `apply_fn(params, x, timesteps)`; x (B, H, W, C).

    On the official float32 solver grid this reproduces DiffPure (tests/test_imagenet_purify.py).
    On `PurifyConfig.time_grid` (t* - k dt in float64, then float32) the timesteps of a t* = 0.15
    solve are the official ones at 148 of 150 steps: the first is 150 where the official
    accumulated solver time gives 149.
    """

    sde = sde or VPSDE()

    def score_fn(params, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        out = apply_fn(params, x, guided_diffusion_timesteps(t, sde.n_discrete))
        eps = out[..., : x.shape[-1]]
        return -eps / sde.std(t)[:, None, None, None]

    return score_fn


SCORE_DTYPES = ("float32", "bfloat16")

# flax layers whose floating inputs are cast to the compute dtype in mixed precision. Casting the
# network's input alone is not enough: the float32 time embedding would promote every later
# activation back to float32 (NCSN++ adds it in every residual block).
_CAST_LAYERS = (
    nn.Dense,
    nn.DenseGeneral,
    nn.Conv,
    nn.ConvTranspose,
    GroupNorm,
    nn.LayerNorm,
    nn.BatchNorm,
)


def _cast_floating(tree, dtype):
    return jax.tree.map(
        lambda a: (
            a.astype(dtype)
            if isinstance(a, jax.Array | jnp.ndarray) and jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        tree,
    )


def _cast_layer_inputs(dtype):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, _CAST_LAYERS):
            args = _cast_floating(args, dtype)
        return next_fun(*args, **kwargs)

    return interceptor


@dataclasses.dataclass(frozen=True)
class LowPrecisionScoreFn:
    """`score_fn` with its network run in `dtype` (e.g. 'bfloat16'); a hashable static function.

    The network variables are cast to `dtype`, and so are the floating inputs of every flax
    layer (Dense, Conv, GroupNorm, ...: the image and the time embedding; flax's normalisation
    statistics stay float32 reductions). The time `t` and the state `x` handed in stay float32,
    the noise labels and std(t) are float32, and the network's output is divided by std(t) in
    float32: the returned score has x's dtype.
    """

    score_fn: ScoreFn
    dtype: str

    def __call__(self, params, x, t):
        dtype = jnp.dtype(self.dtype)
        with nn.intercept_methods(_cast_layer_inputs(dtype)):
            score = self.score_fn(_cast_floating(params, dtype), x, t)
        return score.astype(x.dtype)


def with_score_dtype(score_fn: ScoreFn, dtype: str) -> ScoreFn:
    """`score_fn` itself for 'float32', else a LowPrecisionScoreFn (see there) in `dtype`."""
    if dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {dtype!r}.")
    return score_fn if dtype == "float32" else LowPrecisionScoreFn(score_fn, dtype)


class ScoreModel(eqx.Module):
    """A score network with its variables: `model(x, t)` is the score; a pytree, so it can be
    passed through `jax.jit` as an argument (params stay dynamic, not baked-in constants).

    Attributes: `variables` (Flax variables), `score_fn` (static `ScoreFn`), `sde` (the `VPSDE`),
    `image_shape` (H, W, C) of the images it scores. `model(x, t)`: x (B, H, W, C) in [-1, 1],
    t () or (B,) diffusion time in [0, 1] -> score, x's shape.
    """

    variables: Any
    score_fn: ScoreFn = eqx.field(static=True)
    sde: VPSDE = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __call__(self, x, t):
        return self.score_fn(self.variables, x, t)
