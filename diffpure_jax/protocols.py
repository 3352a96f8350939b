"""Evaluation protocols for a random defense: pure functions of per-draw predictions.

Every reported number names its protocol:

* `one_draw`: AutoAttack's own final check, one forward pass per attack. This is what the DiffPure
  paper reports (the attack suite computes it; see `diffpure_jax.attacks.suites`).
* `worst_of_N`: robust only if all N purifications classify the point right.
* `average_of_N`: the fraction of N purifications that classify it right, averaged.
* `majority_of_N`: robust if the majority vote over N purifications is right. Ties go to the
  lowest class index. This is what a deployed, voting defense does.

The draws follow the project's one EOT convention, `diffpure_jax.attacks.base.eot_keys`.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .attacks.base import eot_keys


def parse_protocols(names: Sequence[str]) -> list[tuple[str, int]]:
    """'one_draw', 'worst_of_10', 'average_of_20', 'majority_of_10' -> [(kind, n), ...]."""
    out = []
    for name in names:
        if name == "one_draw":
            out.append(("one_draw", 1))
            continue
        kind, _, n = name.rpartition("_of_")
        if kind not in ("worst", "average", "majority") or not n.isdigit() or int(n) < 1:
            raise ValueError(
                f"unknown protocol {name!r}; use one_draw, worst_of_N, average_of_N, majority_of_N"
            )
        out.append((kind, int(n)))
    return out


@eqx.filter_jit
def _predict_draws(logits_fn, keys, x):
    return jax.vmap(lambda k: jnp.argmax(logits_fn(x, k), -1))(keys)


def draw_predictions(logits_fn, x, key, n_draws: int, chunk: int = 10) -> jax.Array:
    """(n_draws, B) predictions of n_draws independent forward passes, vmapped in chunks.

    `logits_fn` is traced as a pytree (an equinox Module's arrays stay dynamic), so batches of the
    same shape reuse one compiled program. Draw d uses `eot_keys(key, n_draws)[d]`."""
    keys = eot_keys(key, n_draws)
    return jnp.concatenate(
        [_predict_draws(logits_fn, keys[i : i + chunk], x) for i in range(0, n_draws, chunk)]
    )


def protocol_scores(preds: jax.Array, y: jax.Array, kind: str) -> np.ndarray:
    """Per-example score of one protocol from (N, B) draw predictions: bool or fraction (B,)."""
    correct = preds == y[None]
    if kind == "worst":
        return np.asarray(jnp.all(correct, 0))
    if kind == "average":
        return np.asarray(jnp.mean(correct, 0))
    if kind == "majority":
        n_classes = int(max(int(preds.max()), int(y.max()))) + 1
        counts = jax.nn.one_hot(preds, n_classes).sum(0)  # (B, K)
        return np.asarray(jnp.argmax(counts, -1) == y)
    raise ValueError(f"unknown protocol kind {kind!r}")
