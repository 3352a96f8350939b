"""Classifiers behind the pure seam `apply_fn(variables, x)`, x (B, H, W, C) in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx

# (variables, x (B, H, W, C) in [0, 1]) -> logits (B, num_classes): a flax `module.apply`.
# Not to be confused with the attacks' `LogitsFn`, a model `(x, key) -> logits`.
ApplyFn = Callable[[Any, Any], Any]


class Classifier(eqx.Module):
    """A deterministic classifier with its variables: `classifier(x)` -> (B, num_classes) logits.

    A pytree: pass it through `jax.jit` as an argument so the variables stay dynamic.
    Any input normalisation lives inside the network, as in DiffPure's wrappers.
    """

    variables: Any
    apply_fn: ApplyFn = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __call__(self, x):
        return self.apply_fn(self.variables, x)
