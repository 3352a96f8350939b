"""Random classifiers: the interface every attack and the runner see, and its two models.

`AbstractRandomClassifier` is `model(x, key, index=None)` -> (B, num_classes) logits, with x
(B, H, W, C) in [0, 1], `key` a PRNG key and `index` (B,) the examples' dataset indices (the
noise of a random model follows the example, not its position in the batch). A deterministic
model ignores `key` and `index`. Its `eot` method draws with the project's one EOT convention,
`diffpure_jax.attacks.base.eot_keys`.

`DefendedClassifier` purifies then classifies. In `blind` mode its value is the defended logits
but its gradient is the classifier's alone at x (straight-through around the purifier), the
'attack the classifier, then purify' baseline. `Undefended` is the classifier alone.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax

from .attacks.base import eot_logits
from .classifier import Classifier
from .purify import AbstractPurifier


class AbstractRandomClassifier(eqx.Module):
    """`model(x, key, index=None)` -> (B, num_classes) logits; a pytree (pass it through jit)."""

    @abc.abstractmethod
    def __call__(self, x: jax.Array, key: jax.Array, index: jax.Array | None = None) -> jax.Array:
        """x (B, H, W, C) in [0, 1]; key a PRNG key; index (B,) int dataset indices or None
        (then arange(B)). Returns (B, num_classes) logits of one draw."""

    def eot(self, x: jax.Array, key: jax.Array, n_draws: int, index=None) -> jax.Array:
        """(n_draws, B, num_classes) logits of n_draws draws in one batched (vmapped) call; draw d
        is `self(x, eot_keys(key, n_draws)[d], index)`."""
        return eot_logits(lambda x, k: self(x, k, index), x, key, n_draws)


class DefendedClassifier(AbstractRandomClassifier):
    """Purifier (any AbstractPurifier: VP-SDE `Purifier` or `ddpm.DDPMPurifier`) + classifier,
    a pytree of both models' variables."""

    purifier: AbstractPurifier
    classifier: Classifier

    def __call__(self, x, key, index=None):
        # Purified images may leave [0, 1] (purification is not clipped); x itself is checked
        # by the purifier.
        logits = self.classifier(self.purifier(x, key, index), check=False)
        if self.purifier.config.grad != "blind":
            return logits
        direct = self.classifier(x)
        return direct + jax.lax.stop_gradient(logits - direct)

    def replace(self, **purify_config_changes) -> DefendedClassifier:
        """The same models with purifier config fields changed, e.g. `.replace(grad="bpda")`."""
        return DefendedClassifier(self.purifier.replace(**purify_config_changes), self.classifier)


class Undefended(AbstractRandomClassifier):
    """The classifier alone, behind the random-classifier interface (key and index ignored)."""

    classifier: Classifier

    def __call__(self, x, key, index=None):
        del key, index
        return self.classifier(x)


def undefended(classifier: Classifier) -> Undefended:
    return Undefended(classifier)
