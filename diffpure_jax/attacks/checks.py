"""AutoAttack's guardrails (the reference `autoattack/checks.py`): warnings about models that the
chosen attacks would evaluate wrongly.

* `check_randomized`: the logits change with the key, i.e. a random defense, while the attacks
  average no draws (the `standard` version): single-draw gradients and checks overestimate the
  robustness of a random model; use version='rand' (EOT).
* `check_range_output`: the outputs look like probabilities (in [0, 1], each row summing to 1);
  the attacks' losses (CE, DLR) and FAB expect logits.

They run eagerly on concrete arrays (outside jit), cost one or two forward passes of the clean
batch, and warn with `warnings.warn` (each message once per place, by Python's default filter).
On traced values (a call inside jit) they check nothing and return False.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from .base import LogitsFn

RANDOMIZED_MESSAGE = (
    "the model's logits change with the key (a randomized defense?), but the attacks average "
    "no draws (n_eot=1): use version='rand' (EOT), or set n_eot > 1"
)
PROBABILITIES_MESSAGE = (
    "the model's outputs look like probabilities (in [0, 1], rows sum to 1): pass logits, not "
    "probabilities (e.g. drop the final softmax)"
)


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_randomized(
    logits_fn: LogitsFn,
    x: jax.Array,
    key: jax.Array,
    logits: jax.Array | None = None,
    tol: float = 1e-5,
) -> bool:
    """Warn, and return True, if `logits_fn(x, k)` depends on the key k.

    Compares the logits at `key` (`logits`, if already computed, saves a forward pass) with those
    at a second key, `fold_in(key, 1)`: they differ if a prediction changes or if any row,
    normalised to unit L2 norm, moves by more than `tol` (ref: the same test on two calls).
    """
    if not _concrete(x, key) or (logits is not None and not _concrete(logits)):
        return False
    if logits is None:
        logits = logits_fn(x, key)
    other = logits_fn(x, jax.random.fold_in(key, 1))

    def unit(z):
        z = z.astype(jnp.float32)
        return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-10)

    changed = jnp.any(jnp.argmax(logits, -1) != jnp.argmax(other, -1)) | (
        jnp.max(jnp.abs(unit(logits) - unit(other))) > tol
    )
    if bool(changed):
        warnings.warn(RANDOMIZED_MESSAGE, stacklevel=2)
        return True
    return False


def check_range_output(logits: jax.Array, alpha: float = 1e-5) -> bool:
    """Warn, and return True, if the (B, K) outputs `logits` look like probabilities: all in
    [-alpha, 1 + alpha] and every row summing to 1 within alpha (ref `check_range_output`)."""
    if not _concrete(logits):
        return False
    z = logits.astype(jnp.float32)
    probabilities = (
        (jnp.max(z) < 1.0 + alpha)
        & (jnp.min(z) > -alpha)
        & jnp.all(jnp.abs(jnp.sum(z, axis=-1) - 1.0) < alpha)
    )
    if bool(probabilities):
        warnings.warn(PROBABILITIES_MESSAGE, stacklevel=2)
        return True
    return False
