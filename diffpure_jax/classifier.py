"""Classifiers behind the pure seam `logits_fn(variables, x)`, x (B, H, W, C) in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx

LogitsFn = Callable[[Any, Any], Any]  # (variables, x (B,H,W,C) in [0,1]) -> logits (B, classes)


class Classifier(eqx.Module):
    """A classifier with its variables: `classifier(x)` -> (B, num_classes) logits.

    A pytree: pass it through `jax.jit` as an argument so the variables stay dynamic.
    Any input normalisation lives inside the network, as in DiffPure's wrappers.
    """

    variables: Any
    logits_fn: LogitsFn = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __call__(self, x):
        return self.logits_fn(self.variables, x)
