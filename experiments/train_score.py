"""Train a VP-SDE score model (small NCSN++) on Fashion-MNIST (or any IDX / array dataset).

    python -m experiments.train_score                         # checkpoints/fmnist-ncsnpp-small
    python -m experiments.train_score --steps 20000 --out checkpoints/my-score

Killed and rerun with the same flags, training continues from its last checkpoint in --workdir;
a larger --steps extends a finished run, and --steps 0 exports the latest checkpoint of a
finished, killed or still running job without training. The EMA weights are exported to --out with a
config.json, ready for `diffpure_jax.load_purifier(--out)`. See diffpure_jax/train/score.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from diffpure_jax.data import DataNotFoundError, as_arrays, fashion_mnist_source
from diffpure_jax.train import LoopConfig, ScoreTraining, train_score

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


def build_parser() -> argparse.ArgumentParser:
    d = ScoreTraining()
    p = argparse.ArgumentParser(
        prog="python -m experiments.train_score", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default="checkpoints/fmnist-ncsnpp-small")
    p.add_argument("--workdir", default=None, help="default: workdirs/train/<basename of --out>")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--nf", type=int, default=FMNIST_NCSNPP["nf"])
    p.add_argument("--num-res-blocks", type=int, default=FMNIST_NCSNPP["num_res_blocks"])
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--small-t-fraction", type=float, default=d.small_t_fraction)
    p.add_argument("--small-t-max", type=float, default=d.small_t_max)
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None, after_step=None) -> dict:
    args = build_parser().parse_args(argv)
    if os.path.exists(os.path.join(args.out, "variables")):
        raise SystemExit(f"{args.out} already holds a checkpoint; remove it or pass another --out.")
    try:
        x, _ = as_arrays(fashion_mnist_source("train", args.data_dir))
    except DataNotFoundError as e:
        raise SystemExit(str(e)) from e
    if args.n_train:
        x = x[: args.n_train]
    kwargs = {**FMNIST_NCSNPP, "nf": args.nf, "num_res_blocks": args.num_res_blocks}
    cfg = dataclasses.replace(
        ScoreTraining(),
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        small_t_fraction=args.small_t_fraction,
        small_t_max=args.small_t_max,
    )
    loop = LoopConfig(args.steps, args.batch_size, args.seed, args.save_every)
    workdir = args.workdir or os.path.join(
        "workdirs", "train", os.path.basename(os.path.normpath(args.out))
    )
    config = train_score(
        x,
        args.out,
        workdir,
        kwargs,
        loop,
        cfg,
        progress=not args.no_progress,
        after_step=after_step,
        extra_config={"command": "python -m experiments.train_score " + " ".join(argv or [])},
    )
    print(f"score model ({config['training']['n_steps']} steps) saved to {args.out}")
    return config


if __name__ == "__main__":
    main(sys.argv[1:])
