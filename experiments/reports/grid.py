"""Clean, adversarial and purified examples of an evaluation workdir, with labels, as one PNG.

    python -m experiments.reports.grid --workdir workdir/fmnist_exact/diffpure-...

Reads the workdir's summary.json and its first batch of adversarial examples
(`experiments.fashion_mnist_autoattack`); `x` marks a wrong label.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffpure_jax import load_classifier, load_purifier
from diffpure_jax.data import FASHION_MNIST_CLASSES
from experiments.config import cli_main

from .common import image_grid, load_test_subset, read_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.grid", description=__doc__.splitlines()[0]
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="experiments/results/fashion_mnist_examples.png")
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    s = read_summary(args.workdir)["settings"]
    adv = np.load(os.path.join(args.workdir, "adv", "batch_00000.npz"))
    index, x_adv, y = adv["index"][: args.n], adv["x_adv"][: args.n], adv["y"][: args.n]
    x_all, _, index_all = load_test_subset(s["n_examples"], s["data_seed"], args.data_dir)
    pos = {int(i): k for k, i in enumerate(index_all)}
    x = x_all[[pos[int(i)] for i in index]]
    classifier = load_classifier(s["classifier"])
    purifier = load_purifier(s["score"], t_star=s["t_star"], dt=s["dt"])
    key = jax.random.key(args.seed)
    px = np.asarray(purifier(jnp.asarray(x), key, jnp.asarray(index)))
    pa = np.asarray(purifier(jnp.asarray(x_adv), key, jnp.asarray(index)))

    def names(images):
        pred = np.asarray(classifier(jnp.asarray(np.clip(images, 0, 1))).argmax(-1))
        return [
            FASHION_MNIST_CLASSES[p] + ("" if p == t else " x")
            for p, t in zip(pred, y, strict=True)
        ]

    rows = [x, x_adv, px, pa]
    labels = [
        "clean",
        f"adversarial\n({s['norm']} {s['eps']:g})",
        "purified\nclean",
        "purified\nadv.",
    ]
    image_grid(rows, args.out, labels, [names(r) for r in rows])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
