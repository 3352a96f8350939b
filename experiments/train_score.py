"""Train a VP-SDE score model (small NCSN++) on Fashion-MNIST (or any IDX / array dataset).

    python -m experiments.train_score                         # checkpoints/fmnist-ncsnpp-small
    python -m experiments.train_score --steps 20000 --out checkpoints/my-score

The settings are the config `experiments/configs/train_score.py` (the architecture is its
`FMNIST_NCSNPP`, with `--nf` and `--num-res-blocks`); every flag overrides one of its fields, and
every field of the library's `ScoreTraining` (diffpure_jax/train/score.py) is a flag (`--lr`,
`--warmup-steps`, `--ema-decay`, `--small-t-fraction`, ...).

Killed and rerun with the same flags, training continues from its last checkpoint in --workdir;
a larger --steps extends a finished run, and --steps 0 exports the latest checkpoint of a
finished, killed or still running job without training. The EMA weights are exported to --out with a
config.json, ready for `diffpure_jax.load_purifier(--out)`. See diffpure_jax/train/score.py.
"""

from __future__ import annotations

import os
import sys

from diffpure_jax.data import DataNotFoundError, as_arrays, fashion_mnist_source
from diffpure_jax.train import train_score
from experiments.config import UsageError, cli_main, parse_config
from experiments.configs import train_score as config_module
from experiments.configs.train_score import TrainScoreRun

PROG = "python -m experiments.train_score"


def get_run(argv=None) -> TrainScoreRun:
    """The run's config: the config module's variant with the command line's overrides."""
    title, _, settings = __doc__.split("\n\n")[:3]  # the title and the settings paragraph
    return parse_config(config_module, argv, PROG, " ".join(f"{title} {settings}".split()))


@cli_main
def main(argv=None, after_step=None) -> dict:
    run = get_run(argv)
    if os.path.exists(os.path.join(run.out, "variables")):
        raise UsageError(f"{run.out} already holds a checkpoint; remove it or pass another --out.")
    try:
        x, _ = as_arrays(fashion_mnist_source("train", run.data_dir))
    except DataNotFoundError as e:
        raise UsageError(str(e)) from e
    if run.n_train:
        x = x[: run.n_train]
    config = train_score(
        x,
        run.out,
        run.train_workdir(),
        run.model_kwargs(),
        run.loop(),
        run.training,
        progress=run.progress,
        after_step=after_step,
        extra_config={"command": f"{PROG} " + " ".join(argv or [])},
    )
    print(f"score model ({config['training']['n_steps']} steps) saved to {run.out}")
    return config


if __name__ == "__main__":
    main(sys.argv[1:])
