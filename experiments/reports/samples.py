"""Samples from pure noise (the score model's reverse SDE from t = 1), as one PNG grid.

python -m experiments.reports.samples --n 36 --steps 1000
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from diffpure_jax import load_score_model
from diffpure_jax.sample import sample
from experiments.config import cli_main

from .common import SCORE, image_grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.samples", description=__doc__.splitlines()[0]
    )
    p.add_argument("--score", default=SCORE)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/fashion_mnist_samples.png")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    score = load_score_model(args.score)
    t0 = time.perf_counter()
    x = jax.jit(sample, static_argnums=(2, 3))(score, jax.random.key(args.seed), args.n, args.steps)
    x = np.asarray(x)
    print(f"{args.n} samples, {args.steps} steps, {time.perf_counter() - t0:.0f} s")
    cols = int(np.ceil(np.sqrt(args.n)))
    image_grid([x[i : i + cols] for i in range(0, args.n, cols)], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
