"""What the training configs share: where a run's weights, state and data are."""

from __future__ import annotations

import dataclasses
import os

from .config import field


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """The layout of one training run; none of it changes the trained weights."""

    out: str = field("checkpoints/model", identity=False, help="where the trained model goes")
    workdir: str | None = field(
        None,
        identity=False,
        help="resumable training state; none: workdir/train/<basename of --out>",
    )
    data_dir: str | None = field(
        None, identity=False, help="directory of the Fashion-MNIST IDX files"
    )

    def train_workdir(self) -> str:
        return self.workdir or os.path.join(
            "workdir", "train", os.path.basename(os.path.normpath(self.out))
        )
