"""How much of the label survives the forward diffusion: classifiers on diffused images x_t*.

    python -m experiments.reports.diffused --classifier checkpoints/fmnist-wrn-16-1 \\
        workdir/diag/fmnist-wrn-16-1-diffused --out experiments/results/fashion_mnist_diffused.json

Each classifier is scored on x_t* (the diffused test images the reverse solve starts from, with
the noise purification draws for --seed) and on clean images: the accuracy and the mean
probability of the true class. Purification is a random function of x_t*, so a classifier behind
it is a classifier of x_t*: no purifier can make one-draw purified accuracy exceed the best
accuracy attainable on x_t*. A classifier trained on x_t* (`train_classifier --diffuse-t-star`)
gives a lower estimate of that ceiling, to hold the purified accuracy against.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from diffpure_jax import load_classifier, noise
from diffpure_jax.purify import diffuse_images
from experiments.config import cli_main

from .common import CLASSIFIER, batched, load_test_subset, scores, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.diffused", description=__doc__.splitlines()[0]
    )
    p.add_argument("--classifier", nargs="+", default=[CLASSIFIER])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the numbers as JSON")
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    x, y, index = load_test_subset(args.n, args.data_seed, args.data_dir)

    @jax.jit
    def diffused(xb, ib):
        keys = noise.example_keys(jax.random.key(args.seed), ib)
        eps = noise.forward_noise(keys, xb.shape[1:], xb.dtype)
        return diffuse_images(xb, eps, args.t_star)

    x_t = batched(diffused, args.batch_size, x, index)
    # purified or diffused images may leave [0, 1]: no range check
    probs = jax.jit(lambda c, xb: jax.nn.softmax(c(xb, check=False), -1))
    result = {"n_examples": len(x), "t_star": args.t_star, "seed": args.seed, "classifiers": {}}
    for path in args.classifier:
        c = load_classifier(path)
        per_input = {}
        for name, images in (("clean", x), (f"diffused_t{args.t_star}", x_t)):
            p = batched(lambda xb, c=c: probs(c, xb), args.batch_size, images)
            per_input[name] = {
                **scores(p.argmax(-1), y),
                "mean_true_class_probability": 100.0 * float(np.mean(p[np.arange(len(y)), y])),
            }
            print(
                f"{path}: {name} accuracy {per_input[name]['accuracy']:.2f}%, mean true-class "
                f"probability {per_input[name]['mean_true_class_probability']:.2f}%"
            )
        result["classifiers"][path] = per_input
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
