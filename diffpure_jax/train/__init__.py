"""Training in JAX with optax: score models (VP-SDE denoising score matching) and classifiers
(standard or PGD adversarial training), with seeded batches, progress bars, periodic orbax
checkpoints and resume after a kill. Entry points: `experiments/train_score.py` and
`experiments/train_classifier.py`.
"""

from .classifier import ClassifierTraining, train_classifier
from .loop import LoopConfig, batch_indices, run_training
from .score import ScoreTraining, train_score

__all__ = [
    "ClassifierTraining",
    "LoopConfig",
    "ScoreTraining",
    "batch_indices",
    "run_training",
    "train_classifier",
    "train_score",
]
