"""Training a WideResNet classifier on Fashion-MNIST (`python -m experiments.train_classifier`).

Words of `--config`: `standard` (default: `checkpoints/fmnist-wrn-16-1`, 15 epochs of standard
training) or `pgd` (the shipped PGD-trained `checkpoints/fmnist-wrn-16-1-pgd`: Linf eps 0.1,
PGD-5, 4 epochs). checkpoints/README.md documents both runs.
"""

from __future__ import annotations

import dataclasses

from diffpure_jax.train import ClassifierTraining, LoopConfig
from experiments.config import config_words, field
from experiments.training import TrainingRun


@dataclasses.dataclass(frozen=True)
class TrainClassifierRun(TrainingRun):
    """One training run. Fields with `identity=False` do not change the trained weights (a run
    checkpointed more often, or killed and resumed, computes the same steps)."""

    out: str = field(
        "checkpoints/fmnist-wrn-16-1", identity=False, help="where the trained classifier goes"
    )
    depth: int = field(16, help="WideResNet depth")
    widen_factor: int = field(1, help="WideResNet width")
    epochs: float = field(15.0, help="passes over the training set (fractions allowed)")
    batch_size: int = field(128)
    seed: int = field(0, help="seed of the initialisation, the batches and the augmentation")
    save_every: int = field(200, identity=False, help="checkpoint every N steps")
    init_from: str | None = field(
        None, help="fine-tune this classifier checkpoint (same architecture)"
    )
    n_train: int | None = field(None, help="use the first N training images")
    progress: bool = field(True, identity=False, help="progress bar")
    # Every field of the library's ClassifierTraining is a flag of its own (--lr, --norm, ...).
    training: ClassifierTraining = field(ClassifierTraining())

    def model_kwargs(self) -> dict:
        return {"depth": self.depth, "widen_factor": self.widen_factor, "num_classes": 10}

    def loop(self, n_train: int) -> LoopConfig:
        """The loop over `n_train` training images: `epochs` of them, at least one step."""
        n_steps = max(1, round(self.epochs * n_train / self.batch_size))
        return LoopConfig(n_steps, self.batch_size, self.seed, self.save_every)


WORDS = ("standard", "pgd")


def get_config(arg: str = "") -> TrainClassifierRun:
    """standard (default: checkpoints/fmnist-wrn-16-1, 15 epochs) or pgd (PGD training, Linf eps
    0.1, 5 steps, 4 epochs: checkpoints/fmnist-wrn-16-1-pgd)."""
    words = config_words(arg, WORDS)
    run = TrainClassifierRun()
    if (words or ["standard"])[-1] == "pgd":
        training = dataclasses.replace(run.training, adversarial_eps=0.1, pgd_steps=5)
        run = dataclasses.replace(
            run, training=training, epochs=4.0, out="checkpoints/fmnist-wrn-16-1-pgd"
        )
    return run
