"""Per-example attack losses on logits, as AutoAttack defines them (Croce & Hein 2020).

Every loss takes logits (B, K) and int labels y (B,) and returns (B,); attacks maximise them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(logits: jax.Array, y: jax.Array, min_classes: int, name: str) -> None:
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise ValueError(
            f"{name}: logits must be (B, K) and y (B,), got {logits.shape} and {y.shape}"
        )
    if logits.shape[1] < min_classes:
        raise ValueError(
            f"{name} needs at least {min_classes} classes (it uses the {min_classes} largest "
            f"logits), got K = {logits.shape[1]}"
        )


def _pick(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def _max_other(logits: jax.Array, y: jax.Array) -> jax.Array:
    """max_{i != y} z_i, (B,)."""
    is_y = jax.nn.one_hot(y, logits.shape[1], dtype=jnp.bool_)
    return jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=1)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """CE(z, y) = -log softmax(z)_y = logsumexp(z) - z_y, (B,)."""
    _check(logits, y, 2, "cross_entropy")
    return -_pick(jax.nn.log_softmax(logits, axis=1), y)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """z_y - max_{i != y} z_i, (B,): negative iff misclassified (ties aside)."""
    _check(logits, y, 2, "margin")
    return _pick(logits, y) - _max_other(logits, y)


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Untargeted Difference of Logits Ratio, (B,):

        DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),

    pi the classes sorted by decreasing logit (reference `APGDAttack.dlr_loss`). Invariant to
    shifting and scaling the logits. Needs K >= 4 (as the targeted version; AutoAttack's DLR
    attacks are meant for K >= 4).
    """
    _check(logits, y, 4, "dlr")
    top = jax.lax.top_k(logits, 3)[0]
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
    """Targeted DLR, (B,) (reference `APGDAttack_targeted.dlr_loss_targeted`):

        DLR_t(z, y) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12),

    t = y_target (B,) int, pi the classes sorted by decreasing logit. Needs K >= 4.
    """
    _check(logits, y, 4, "dlr_targeted")
    if y_target.shape != y.shape:
        raise ValueError(f"dlr_targeted: y_target must be {y.shape}, got {y_target.shape}")
    top = jax.lax.top_k(logits, 4)[0]
    num = _pick(logits, y) - _pick(logits, y_target)
    return -num / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
