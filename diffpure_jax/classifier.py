"""Classifiers behind the pure seam `apply_fn(variables, x)`, x (B, H, W, C) in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx

from .purify import check_images

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

    def __call__(self, x, check: bool = True):
        """Logits (B, num_classes) of x (B, H, W, C), float images in [0, 1].

        x is refused as `purify.check_images` says (shape `image_shape`, floating point, in
        [0, 1]; the range also inside jit). `check=False` (a Python bool) skips the checks, for
        inputs that may leave [0, 1] by design: purified images (purification is not clipped)
        or diffused ones. The logits are the same either way.
        """
        if check:
            x = check_images(x, self.image_shape)
        return self.apply_fn(self.variables, x)
