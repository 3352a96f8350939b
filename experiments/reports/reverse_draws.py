"""One purification draw against the vote of reverse draws from the same diffused image x_t*.

    python -m experiments.reports.reverse_draws --n 400 --draws 5 \\
        --out experiments/results/fashion_mnist_reverse_draws.json

How much one draw loses to the reverse SDE's own randomness. Each test image is diffused once
(the forward noise of the `accuracy` report's draw) and solved back --draws times with independent
reverse noise (draw 0 is the `accuracy` report's purification). Per classifier: the mean one-draw
accuracy over the reverse draws, and the accuracy of their majority vote (`majority_of_N`'s rule,
ties to the lowest class index): a purifier deterministic given x_t* would score about the vote, a
posterior sampler scores the mean. The purified images are kept and resumed like the `accuracy`
report's.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffpure_jax import load_classifier, load_purifier
from diffpure_jax.protocols import protocol_scores
from experiments.config import cli_main

from .common import (
    CLASSIFIER,
    add_purified_test_args,
    batched,
    purified_test_images,
    scores_of_correct,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.reverse_draws", description=__doc__.splitlines()[0]
    )
    p.add_argument("--classifier", nargs="+", default=[CLASSIFIER])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--t-star", type=float, default=0.1)
    add_purified_test_args(p)
    return p


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    # purified or diffused images may leave [0, 1]: no range check
    probs = jax.jit(lambda c, xb: jax.nn.softmax(c(xb, check=False), -1))
    classifiers = {path: load_classifier(path) for path in args.classifier}
    purifier = load_purifier(args.score, t_star=args.t_star, dt=args.dt)
    p = {c: [] for c in classifiers}  # per classifier: (draws, n, K) probabilities
    for d in range(args.draws):
        _, y, _, purified = purified_test_images(args, args.t_star, d, purifier)
        for path, c in classifiers.items():
            p[path].append(batched(lambda xb, c=c: probs(c, xb), args.batch_size, purified))
    result = {"n_examples": len(y), "t_star": args.t_star, "dt": args.dt, "seed": args.seed}
    result.update(draws=args.draws, score=args.score, classifiers={})
    for path, ps in p.items():
        ps = np.stack(ps)  # (draws, n, K)
        vote = protocol_scores(jnp.asarray(ps.argmax(-1)), jnp.asarray(y), "majority")
        draw_acc = [100.0 * float(np.mean(pd.argmax(-1) == y)) for pd in ps]
        s = {
            "one_draw_accuracy_per_draw": draw_acc,
            "one_draw_accuracy_mean": float(np.mean(draw_acc)),
            "majority_vote": scores_of_correct(vote, y),
        }
        result["classifiers"][path] = s
        print(
            f"{path}: one draw {s['one_draw_accuracy_mean']:.2f}% (mean of {args.draws} "
            f"reverse draws from the same x_t*), their majority vote "
            f"{s['majority_vote']['accuracy']:.2f}%"
        )
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
