"""Unconditional samples from a score model: the reverse VP-SDE from pure noise at t = 1.

The same solver as purification (Euler-Maruyama on a uniform grid, stopping at t_end), started
from x_1 ~ N(0, I) instead of a diffused image. Used to check a trained score model by eye.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import noise
from .purify import PurifyConfig, make_path, reverse_solve
from .score import ScoreModel


def sample(score: ScoreModel, key: jax.Array, n: int, n_steps: int = 1000) -> jax.Array:
    """n samples (n, H, W, C) in [0, 1] (clipped), with n_steps reverse Euler-Maruyama steps."""
    config = PurifyConfig(t_star=1.0, dt=1.0 / n_steps, grad="blind")
    keys = noise.example_keys(key, jnp.arange(n), 0)
    x_1 = noise.forward_noise(keys, score.image_shape, jnp.float32)
    ts = jnp.asarray(config.time_grid(), jnp.float32)
    path = make_path(config, keys, score.image_shape, jnp.float32, ts)
    x_0 = reverse_solve(score.sde, score.score_fn, config, score.variables, x_1, ts, path)
    return jnp.clip((x_0 + 1.0) / 2.0, 0.0, 1.0)
