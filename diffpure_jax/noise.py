"""Purification noise as a pure function of (key, example index, draw, step).

Every random number of one purification is derived from the user's key by `jax.random.fold_in`:

    example key  = fold_in(fold_in(key, draw), example_index)
    forward eps  = normal(fold_in(example key, 0), image shape)
    step k noise = normal(fold_in(fold_in(example key, 1), k), image shape)

so a recomputation (checkpointed gradients, the adjoint's backward pass) replays exactly the same
path, and an example's result does not depend on the batch it is in, on the number of devices or on
where a run resumed. `draw` separates the EOT copies of one input.

Two Brownian paths over the reverse-time grid are offered to diffrax:

* `GridBrownianPath` (default): draws step k's increment on demand from the step key. Exact for
  queries on the step grid, which is all a fixed-step solve makes (Euler, Heun, EulerHeun,
  Midpoint, ReversibleHeun). Cheap: one normal draw per step, nothing stored.
* `TreeBrownianPath`: one diffrax `VirtualBrownianTree` per example, queried anywhere (needed by
  solvers that evaluate off-grid or need Levy area). Every query walks the tree, so it costs more
  per step than the grid path; `benchmarks/purify_cpu.py` measures both (benchmarks/README.md).
"""

from __future__ import annotations

import abc

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

FORWARD_STREAM = 0
STEP_STREAM = 1


def example_keys(key: jax.Array, index: jax.Array, draw: int | jax.Array = 0) -> jax.Array:
    """(B,) per-example keys from one key, the examples' dataset indices (B,) and the draw."""
    draw_key = jax.random.fold_in(key, draw)
    return jax.vmap(lambda i: jax.random.fold_in(draw_key, i))(index)


def forward_noise(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """(B, *shape) standard normal noise of the forward diffusion, one draw per example key."""
    return jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, FORWARD_STREAM), shape, dtype)
    )(keys)


def step_noise(keys: jax.Array, step: jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
    """(B, *shape) standard normal z_k of reverse step `step`, one draw per example key."""

    def one(k):
        k = jax.random.fold_in(jax.random.fold_in(k, STEP_STREAM), step)
        return jax.random.normal(k, shape, dtype)

    return jax.vmap(one)(keys)


class ReverseGridPath(diffrax.AbstractBrownianPath):
    """Brownian path on a fixed reverse-time grid ts[0] = t* > ts[1] > ... > ts[n] = t_end.

    Subclasses give `reverse_increment(k)`, the increment that reverse step k (from ts[k] down to
    ts[k+1]) applies. As a process indexed by increasing t, W(ts[k]) - W(ts[k+1]) is its negation,
    which diffrax's reversal of time turns back into +reverse_increment(k).
    Only queries over one grid step are valid.
    """

    ts: eqx.AbstractVar[jax.Array]

    @property
    def t0(self):
        return self.ts[-1]

    @property
    def t1(self):
        return self.ts[0]

    @abc.abstractmethod
    def reverse_increment(self, k):
        """(B, *shape) increment applied by reverse step k."""

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        if t1 is None or use_levy:
            raise ValueError(
                "grid Brownian paths only answer increments over one step of their grid; use "
                "brownian='tree' for solvers that need point values or Levy area."
            )
        k = jnp.argmin(jnp.abs(self.ts[:-1] - jnp.maximum(t0, t1)))
        increment = self.reverse_increment(k)
        return jnp.where(t1 > t0, -increment, increment)


class GridBrownianPath(ReverseGridPath):
    """The default path: step k's increment is sqrt_dt[k] * `step_noise(keys, k)`, drawn on
    demand (nothing stored; replayed exactly in recomputation). `sqrt_dt` defaults to
    sqrt(ts[k] - ts[k+1])."""

    ts: jax.Array
    sqrt_dt: jax.Array
    keys: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True, default=jnp.float32)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    def reverse_increment(self, k):
        return self.sqrt_dt[k] * step_noise(self.keys, k, self.shape, self.dtype)


class StoredBrownianPath(ReverseGridPath):
    """Replays given increments: `increments[k]` (B, *shape) is applied by reverse step k. Used to
    reproduce a reference run's noise exactly."""

    ts: jax.Array
    increments: jax.Array
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    def reverse_increment(self, k):
        return self.increments[k]


class TreeBrownianPath(diffrax.AbstractBrownianPath):
    """One diffrax VirtualBrownianTree per example (key), over [t_end, t*], tolerance `tol`."""

    t_lo: float = eqx.field(static=True)
    t_hi: float = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    keys: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True, default=jnp.float32)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    @property
    def t0(self):
        return self.t_lo

    @property
    def t1(self):
        return self.t_hi

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        def one(k):
            tree = diffrax.VirtualBrownianTree(
                self.t_lo,
                self.t_hi,
                tol=self.tol,
                shape=jax.ShapeDtypeStruct(self.shape, self.dtype),
                key=jax.random.fold_in(k, STEP_STREAM),
                levy_area=self.levy_area,
            )
            return tree.evaluate(t0, t1, left=left, use_levy=use_levy)

        return jax.vmap(one)(self.keys)
