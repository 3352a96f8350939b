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

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

NORMS = ("Linf", "L2", "L1")  # Lp threats: a ball around x
SPATIAL = ("StAdv",)  # threats on a sampling grid (`attacks.stadv`), not on x_adv - x
THREATS = NORMS + SPATIAL
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Threat:
    """An Lp ball of radius eps around the clean image, intersected with [0, 1]^d; or, norm
    "StAdv" (`spatial`), StAdv's flow threat: x_adv = `stadv.grid_sample(x, grid)`, the sampling
    grid (B, H, W, 2) inside [-1, 1] and within eps (Linf, normalised grid units; DiffPure: 0.05)
    of the identity. A spatial threat is checked on its grid (`in_threat(..., grid=)`)."""

    norm: str = "Linf"
    eps: float = 8 / 255

    def __post_init__(self):
        if self.norm not in THREATS:
            raise ValueError(f"norm must be one of {THREATS}, got {self.norm!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    @property
    def spatial(self) -> bool:
        """True for a threat on a sampling grid (StAdv), False for an Lp ball."""
        return self.norm in SPATIAL


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


def project_l1_box(delta: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Exact Euclidean projection of each delta (B, ...) onto {d : ||d||_1 <= eps, 0 <= x+d <= 1}.

    What ref `L1_projection` computes (there returned as a correction to add): d_i = sign(delta_i)
    min(max(|delta_i| - lam, 0), c_i), c_i the room to the box in delta_i's direction, lam >= 0
    the smallest with ||d||_1 <= eps, found exactly from the sorted breakpoints of the piecewise
    linear ||d(lam)||_1. x (B, ...) in [0, 1].
    """
    shape = delta.shape
    v = delta.reshape(shape[0], -1)
    xf = x.reshape(shape[0], -1)
    a = jnp.abs(v)
    cap = jnp.maximum(jnp.where(v >= 0, 1.0 - xf, xf), 0.0)
    # G(lam) = sum_i min(max(a_i - lam, 0), cap_i): slope -1 on [max(a_i - cap_i, 0), a_i].
    pts = jnp.concatenate([jnp.maximum(a - cap, 0.0), a], axis=1)
    dslope = jnp.concatenate([-jnp.ones_like(a), jnp.ones_like(a)], axis=1)
    order = jnp.argsort(pts, axis=1)
    pts = jnp.take_along_axis(pts, order, axis=1)
    slope = jnp.cumsum(jnp.take_along_axis(dslope, order, axis=1), axis=1)
    g0 = jnp.sum(jnp.minimum(a, cap), axis=1, keepdims=True)
    seg = slope[:, :-1] * (pts[:, 1:] - pts[:, :-1])
    g = g0 + jnp.concatenate([jnp.zeros_like(g0), jnp.cumsum(seg, axis=1)], axis=1)
    # Last breakpoint with G > eps (G is non-increasing); lam lies on the segment after it.
    j = jnp.maximum(jnp.sum(g > eps, axis=1, keepdims=True) - 1, 0)
    p_j = jnp.take_along_axis(pts, j, axis=1)
    g_j = jnp.take_along_axis(g, j, axis=1)
    s_j = jnp.take_along_axis(slope, j, axis=1)
    lam = jnp.where(g0 > eps, p_j + (g_j - eps) / jnp.maximum(-s_j, 1.0), 0.0)
    d = jnp.sign(v) * jnp.minimum(jnp.maximum(a - lam, 0.0), cap)
    # Float rounding safeguard: shrinking the magnitudes keeps d inside the box.
    n1 = jnp.sum(jnp.abs(d), axis=1, keepdims=True)
    d = d * jnp.minimum(1.0, eps / jnp.maximum(n1, 1e-30))
    return d.reshape(shape)


def project(x_adv: jax.Array, x: jax.Array, threat: Threat) -> jax.Array:
    """Project x_adv onto {x + delta : ||delta|| <= eps} and then clip to [0, 1].

    Linf and L1: the exact Euclidean projection onto the intersection. L2: projection onto the
    ball, then the box (what the reference attacks do; the result is inside both sets).
    """
    if threat.spatial:
        raise ValueError(f"{threat} bounds a sampling grid: project it with stadv.project_flow")
    delta = x_adv - x
    if threat.norm == "Linf":
        delta = jnp.clip(delta, -threat.eps, threat.eps)
    elif threat.norm == "L2":
        n = lp_norm(delta, "L2")
        delta = delta * _expand(jnp.minimum(1.0, threat.eps / jnp.maximum(n, 1e-12)), delta)
    else:
        return x + project_l1_box(delta, x, threat.eps)
    return jnp.clip(x + delta, 0.0, 1.0)


def in_threat(
    x_adv: jax.Array, x: jax.Array, threat: Threat, tol: float = 1e-5, grid: jax.Array | None = None
) -> jax.Array:
    """(B,) bool: x_adv is inside the eps ball around x (up to tol) and inside [0, 1].

    A spatial threat (StAdv) needs the attack's sampling grid (B, H, W, 2): then x_adv must be
    in [0, 1] and `grid_sample(x, grid)`, and the grid in [-1, 1] and within eps of the identity
    (`stadv.in_flow_threat`). grid is ignored for an Lp threat."""
    if threat.spatial:
        if grid is None:
            raise ValueError(f"{threat} is checked on the attack's sampling grid: pass grid=")
        from .stadv import in_flow_threat  # stadv imports this module

        return in_flow_threat(x_adv, x, grid, threat.eps, tol)
    inside_box = jnp.all((x_adv >= -tol) & (x_adv <= 1 + tol), axis=tuple(range(1, x.ndim)))
    return inside_box & (lp_norm(x_adv - x, threat.norm) <= threat.eps * (1 + tol) + tol)


def eot_keys(key: jax.Array, n_draws: int) -> jax.Array:
    """The keys of n_draws EOT draws: draw d uses `jax.random.split(key, n_draws)[d]`.

    The one EOT convention of the project: attacks, protocols and `AbstractRandomClassifier.eot`
    all draw this way, so draw d of any of them is the same forward pass."""
    return jax.random.split(key, n_draws)


def check_eot_chunk(chunk: int | None, n_draws: int) -> int | None:
    """The chunk size to use for n_draws draws: None (one vmapped call) when chunk is None or
    covers every draw. Raises ValueError unless chunk is None or a positive int."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(
            f"eot_chunk must be a positive int (EOT draws per vmapped call) or None, got {chunk!r}"
        )
    return None if chunk >= n_draws else int(chunk)


def _split_chunks(keys: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(n // chunk, chunk, ...) keys of the full chunks, in draw order, and the (n % chunk, ...)
    keys of the remainder chunk."""
    n_full = keys.shape[0] // chunk
    full = keys[: n_full * chunk].reshape(n_full, chunk, *keys.shape[1:])
    return full, keys[n_full * chunk :]


def eot_logits(
    logits_fn: LogitsFn, x: jax.Array, key: jax.Array, n_draws: int, chunk: int | None = None
) -> jax.Array:
    """(n_draws, B, K) logits of n_draws draws (`eot_keys`), one batched (vmapped) call or chunks.

    chunk: None (or >= n_draws): one vmapped call of all draws. Else the draws go `chunk` at a
    time (one vmapped call each, a `lax.map` over the chunks, the last chunk holding the
    remainder), and each chunk is rematerialised (`jax.checkpoint`) when differentiated: only
    one chunk's activations are live at once, in the forward pass and in a gradient through
    this function (at the price of a second forward pass per chunk in the gradient). Draw d is
    `eot_keys(key, n_draws)[d]` either way, so the logits equal the unchunked ones."""
    chunk = check_eot_chunk(chunk, n_draws)
    if n_draws == 1:
        return logits_fn(x, key)[None]
    keys = eot_keys(key, n_draws)
    if chunk is None:
        return jax.vmap(lambda k: logits_fn(x, k))(keys)
    draws = jax.checkpoint(jax.vmap(lambda k: logits_fn(x, k)))
    full, rest = _split_chunks(keys, chunk)
    logits = jax.lax.map(draws, full)
    logits = logits.reshape(-1, *logits.shape[2:])
    if rest.shape[0]:
        logits = jnp.concatenate([logits, draws(rest)])
    return logits


def eot_value_and_grad(
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    x: jax.Array,
    key: jax.Array,
    n_eot: int = 1,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example loss, its gradient in x and the logits, averaged over n_eot random draws.

    loss_fn(x, key) -> (loss (B,), logits (B, K)). The draws are one batched (vmapped) call.
    Returns (loss (B,), grad (B, H, W, C), logits (B, K)), each the mean over draws.

    chunk: None (or >= n_eot): one vmapped call of all draws. Else the draws go `chunk` at a
    time, one vmapped call each, in a `lax.scan` over the chunks that accumulates the sums of
    loss, gradient and logits (the last chunk holds the remainder when chunk does not divide
    n_eot), so only one chunk's activations and gradients are live at once: memory of `chunk`
    draws, any n_eot. Draw d is `eot_keys(key, n_eot)[d]` either way, so the result equals the
    unchunked one up to float32 summation order.
    """
    chunk = check_eot_chunk(chunk, n_eot)

    def one(k):
        def total(x):
            loss, logits = loss_fn(x, k)
            return jnp.sum(loss), (loss, logits)

        grad, (loss, logits) = jax.grad(total, has_aux=True)(x)
        return loss, grad, logits

    if n_eot == 1:
        loss, grad, logits = one(key)
        return loss, grad, logits
    keys = eot_keys(key, n_eot)
    if chunk is None:
        loss, grad, logits = jax.vmap(one)(keys)
        return loss.mean(0), grad.mean(0), logits.mean(0)

    def chunk_sums(ks):
        return jax.tree.map(lambda v: v.sum(0), jax.vmap(one)(ks))

    def body(sums, ks):
        return jax.tree.map(jnp.add, sums, chunk_sums(ks)), None

    full, rest = _split_chunks(keys, chunk)
    sums = chunk_sums(full[0])
    if full.shape[0] > 1:
        sums, _ = jax.lax.scan(body, sums, full[1:])
    if rest.shape[0]:
        sums = jax.tree.map(jnp.add, sums, chunk_sums(rest))
    loss, grad, logits = (v / n_eot for v in sums)
    return loss, grad, logits


class AuxObjective(eqx.Module):
    """A random classifier whose attack objective has an extra per-example term.

    `obj(x, key)` -> logits (B, K), as any model; `obj.logits_and_aux(x, key)` -> (logits (B, K),
    aux (B,)) from one forward pass. Gradient attacks that support it (`apgd.apgd`, and so
    AutoAttack's APGD attacks) maximise loss(logits) + aux; every misclassification check uses
    the logits alone. Implemented by DiffAttack's `attacks.diffattack.DeviatedReconstruction`."""

    @abc.abstractmethod
    def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """(B, K) logits of one draw."""

    @abc.abstractmethod
    def logits_and_aux(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """((B, K) logits, (B,) the extra objective term) of one draw."""


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
