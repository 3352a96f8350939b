"""Clean and purified clean accuracy of classifiers on the Fashion-MNIST test set.

    python -m experiments.reports.accuracy --n 1000 --t-star 0.1 \\
        --out experiments/results/fashion_mnist_accuracy.json

Every classifier sees the same purified images (one draw per t*), so their losses under
purification compare directly. The purified images are kept (and resumed) under --purified-root:
a rerun, or another classifier, reads them back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from diffpure_jax import load_classifier
from experiments.config import cli_main

from .common import (
    ADV_CLASSIFIER,
    CLASSIFIER,
    add_purified_test_args,
    batched,
    purified_test_images,
    scores,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.accuracy", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--classifier",
        nargs="+",
        default=[CLASSIFIER, ADV_CLASSIFIER],
        help="one or more classifiers, all scored on the same purified images",
    )
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--t-star", type=float, nargs="+", default=[0.1])
    add_purified_test_args(p)
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    classifiers = {path: load_classifier(path) for path in args.classifier}
    # purified images may leave [0, 1] (not clipped): no range check
    classify = jax.jit(lambda c, xb: c(xb, check=False).argmax(-1))
    result = {"n_examples": None, "data_seed": args.data_seed, "dt": args.dt, "seed": args.seed}
    result["score"], result["classifiers"] = args.score, {c: {} for c in classifiers}
    for t_star in args.t_star:
        t0 = time.perf_counter()
        x, y, _, purified = purified_test_images(args, t_star)
        seconds = time.perf_counter() - t0
        result["n_examples"] = len(x)
        for path, c in classifiers.items():
            s = result["classifiers"][path]
            if "clean" not in s:
                s["clean"] = scores(batched(lambda xb, c=c: classify(c, xb), args.batch_size, x), y)
            pred = batched(lambda xb, c=c: classify(c, xb), args.batch_size, purified)
            s[f"purified_t{t_star}"] = scores(pred, y)
            print(
                f"{path}: clean {s['clean']['accuracy']:.2f}%, purified (t* = {t_star}, "
                f"dt = {args.dt}, one draw) {s[f'purified_t{t_star}']['accuracy']:.2f}% "
                f"(purification {seconds:.0f} s)"
            )
    print(json.dumps(result, indent=1))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
