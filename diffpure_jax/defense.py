"""The defended classifier: purify, then classify. `defended(x, key)` -> logits.

In `blind` mode the value is the defended logits but the gradient is the classifier's alone at
x (straight-through around the purifier), the 'attack the classifier, then purify' baseline.
"""

from __future__ import annotations

import equinox as eqx
import jax

from .classifier import Classifier
from .purify import Purifier


class DefendedClassifier(eqx.Module):
    """Purifier + classifier, a pytree of both models' variables."""

    purifier: Purifier
    classifier: Classifier

    def _straight_through(self, x, logits):
        if self.purifier.config.grad != "blind":
            return logits
        direct = self.classifier(x)
        return direct + jax.lax.stop_gradient(logits - direct)

    def __call__(self, x, key, index=None, draw=0):
        """(B, H, W, C) in [0, 1] -> (B, num_classes) logits of one purification."""
        return self._straight_through(x, self.classifier(self.purifier(x, key, index, draw)))

    def eot(self, x, key, n_draws: int, index=None):
        """(n_draws, B, num_classes) logits of n_draws purifications, in one batched call."""
        purified = self.purifier.eot(x, key, n_draws, index)
        logits = self.classifier(purified.reshape(-1, *x.shape[1:]))
        logits = logits.reshape(n_draws, x.shape[0], -1)
        return jax.vmap(lambda lg: self._straight_through(x, lg))(logits)

    def replace(self, **purify_config_changes) -> DefendedClassifier:
        return DefendedClassifier(self.purifier.replace(**purify_config_changes), self.classifier)


class Undefended(eqx.Module):
    """The classifier alone, with the defended model's signature `(x, key, index=None, draw=0)`."""

    classifier: Classifier

    def __call__(self, x, key, index=None, draw=0):
        del key, index, draw
        return self.classifier(x)


def undefended(classifier: Classifier) -> Undefended:
    return Undefended(classifier)
