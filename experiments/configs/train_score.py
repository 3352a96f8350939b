"""Training a VP-SDE score model (NCSN++) on Fashion-MNIST (`python -m experiments.train_score`).

Words of `--config`: `small` (default: the shipped `checkpoints/fmnist-ncsnpp-small`, 6000 steps
of batch 64; checkpoints/README.md documents the run).
"""

from __future__ import annotations

import dataclasses

from diffpure_jax.train import LoopConfig, ScoreTraining
from experiments.config import config_words, field
from experiments.training import TrainingRun

# A small NCSN++ for 28x28x1: three levels (28, 14, 7), attention at 7x7, no dropout.
FMNIST_NCSNPP = {
    "nf": 16,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [7],
    "image_size": 28,
    "num_channels": 1,
    "dropout": 0.0,
}


@dataclasses.dataclass(frozen=True)
class TrainScoreRun(TrainingRun):
    """One training run. Fields with `identity=False` do not change the trained weights (a run
    checkpointed more often, or killed and resumed, computes the same steps)."""

    out: str = field(
        "checkpoints/fmnist-ncsnpp-small", identity=False, help="where the EMA weights go"
    )
    steps: int = field(
        6000, help="optimiser steps; a larger value extends a finished run, 0 exports the latest"
    )
    batch_size: int = field(64)
    seed: int = field(0, help="seed of the initialisation, the batches and the noise")
    save_every: int = field(250, identity=False, help="checkpoint every N steps")
    nf: int = field(FMNIST_NCSNPP["nf"], help="NCSN++ base channels (of FMNIST_NCSNPP)")
    num_res_blocks: int = field(FMNIST_NCSNPP["num_res_blocks"], help="residual blocks per level")
    n_train: int | None = field(None, help="use the first N training images")
    progress: bool = field(True, identity=False, help="progress bar")
    # Every field of the library's ScoreTraining is a flag of its own (--lr, --ema-decay, ...).
    training: ScoreTraining = field(ScoreTraining())

    def model_kwargs(self) -> dict:
        return {**FMNIST_NCSNPP, "nf": self.nf, "num_res_blocks": self.num_res_blocks}

    def loop(self) -> LoopConfig:
        return LoopConfig(self.steps, self.batch_size, self.seed, self.save_every)


WORDS = ("small",)


def get_config(arg: str = "") -> TrainScoreRun:
    """small (default: checkpoints/fmnist-ncsnpp-small, NCSN++ nf 16, 6000 steps)."""
    config_words(arg, WORDS)  # refuses unknown words
    return TrainScoreRun()
