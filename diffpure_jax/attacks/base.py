"""What every attack shares: the threat model, projection, the result type and EOT gradients.

Attacks know nothing of diffusion. They take `logits_fn(x, key) -> logits`:
x (B, H, W, C) in [0, 1], key a PRNG key (deterministic models ignore it), logits (B, K).
`logits_fn` may be an equinox Module (a pytree, e.g. `DefendedClassifier` bound to dataset
indices with `bind_index`), so that attacks jitted with `eqx.filter_jit` trace its arrays instead
of baking them into the program. Every attack works on the whole batch with an `active` mask
(B,) bool: inactive examples are returned unchanged (static shapes: no recompilation as points
are broken).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

NORMS = ("Linf", "L2", "L1")
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Threat:
    """An Lp ball of radius eps around the clean image, intersected with [0, 1]^d."""

    norm: str = "Linf"
    eps: float = 8 / 255

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


class AttackResult(NamedTuple):
    """x_adv: (B, H, W, C) the best point found (x itself where nothing was found or the example
    was inactive); fooled: (B,) bool, whether the attack's own check (one forward pass, one draw
    for a random model) misclassified x_adv."""

    x_adv: jax.Array
    fooled: jax.Array


def _per_example(fn, x):
    return fn(x.reshape(x.shape[0], -1))


def lp_norm(delta: jax.Array, norm: str) -> jax.Array:
    """(B,) Lp norms of a batch of perturbations."""
    if norm == "Linf":
        return _per_example(lambda d: jnp.max(jnp.abs(d), axis=1), delta)
    if norm == "L2":
        return _per_example(lambda d: jnp.sqrt(jnp.sum(d**2, axis=1)), delta)
    if norm == "L1":
        return _per_example(lambda d: jnp.sum(jnp.abs(d), axis=1), delta)
    raise ValueError(f"unknown norm {norm!r}")


def _expand(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def project_l1_ball(delta: jax.Array, eps: jax.Array | float) -> jax.Array:
    """Euclidean projection of each row of delta onto the L1 ball of radius eps (Duchi et al.)."""
    flat = delta.reshape(delta.shape[0], -1)
    a = jnp.abs(flat)
    srt = -jnp.sort(-a, axis=1)
    cssv = jnp.cumsum(srt, axis=1) - jnp.reshape(jnp.asarray(eps), (-1, 1))
    ind = jnp.arange(1, flat.shape[1] + 1, dtype=flat.dtype)
    cond = srt - cssv / ind > 0
    rho = jnp.max(jnp.where(cond, ind, 0), axis=1, keepdims=True)
    theta = jnp.take_along_axis(cssv, rho.astype(jnp.int32) - 1, axis=1) / rho
    proj = jnp.sign(flat) * jnp.maximum(a - theta, 0.0)
    inside = jnp.sum(a, axis=1, keepdims=True) <= jnp.reshape(jnp.asarray(eps), (-1, 1))
    return jnp.where(inside, flat, proj).reshape(delta.shape)


def project(x_adv: jax.Array, x: jax.Array, threat: Threat) -> jax.Array:
    """Project x_adv onto {x + delta : ||delta|| <= eps} and then clip to [0, 1].

    Linf: exact projection onto the intersection. L2 and L1: projection onto the ball, then the
    box (what the reference attacks do; the result is inside both sets).
    """
    delta = x_adv - x
    if threat.norm == "Linf":
        delta = jnp.clip(delta, -threat.eps, threat.eps)
    elif threat.norm == "L2":
        n = lp_norm(delta, "L2")
        delta = delta * _expand(jnp.minimum(1.0, threat.eps / jnp.maximum(n, 1e-12)), delta)
    else:
        delta = project_l1_ball(delta, threat.eps)
    return jnp.clip(x + delta, 0.0, 1.0)


def in_threat(x_adv: jax.Array, x: jax.Array, threat: Threat, tol: float = 1e-5) -> jax.Array:
    """(B,) bool: x_adv is inside the eps ball around x (up to tol) and inside [0, 1]."""
    inside_box = jnp.all((x_adv >= -tol) & (x_adv <= 1 + tol), axis=tuple(range(1, x.ndim)))
    return inside_box & (lp_norm(x_adv - x, threat.norm) <= threat.eps * (1 + tol) + tol)


def eot_value_and_grad(
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    x: jax.Array,
    key: jax.Array,
    n_eot: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example loss, its gradient in x and the logits, averaged over n_eot random draws.

    loss_fn(x, key) -> (loss (B,), logits (B, K)). The draws are one batched (vmapped) call.
    Returns (loss (B,), grad (B, H, W, C), logits (B, K)), each the mean over draws.
    """

    def one(k):
        def total(x):
            loss, logits = loss_fn(x, k)
            return jnp.sum(loss), (loss, logits)

        grad, (loss, logits) = jax.grad(total, has_aux=True)(x)
        return loss, grad, logits

    if n_eot == 1:
        loss, grad, logits = one(key)
        return loss, grad, logits
    loss, grad, logits = jax.vmap(one)(jax.random.split(key, n_eot))
    return loss.mean(0), grad.mean(0), logits.mean(0)


class IndexedModel(eqx.Module):
    """`model(x, key)` for a model that takes dataset indices: calls `model(x, key, index)`.

    Binds the examples' dataset indices so that a random defense's noise follows the example,
    not its position in the batch. A pytree (the model's arrays stay dynamic under filter_jit).
    """

    model: Any
    index: jax.Array

    def __call__(self, x, key):
        return self.model(x, key, index=self.index)


def bind_index(model: Any, index: jax.Array) -> IndexedModel:
    return IndexedModel(model, jnp.asarray(index))
