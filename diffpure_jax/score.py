"""Score functions: a noise-prediction network behind the pure seam `score_fn(params, x, t)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

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


class ScoreModel(eqx.Module):
    """A score network with its variables: `model(x, t)` is the score; a pytree, so it can be
    passed through `jax.jit` as an argument (params stay dynamic, not baked-in constants).

    Attributes: `variables` (Flax variables), `score_fn` (static pure function), `sde`, `config`.
    """

    variables: Any
    score_fn: ScoreFn = eqx.field(static=True)
    sde: VPSDE = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __call__(self, x, t):
        return self.score_fn(self.variables, x, t)
