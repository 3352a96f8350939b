"""DiffPure on Fashion-MNIST, end to end and offline: the project's embedded default.

    python -m experiments.fashion_mnist_autoattack      # quick comparison, <= 10 min on 2 CPU cores

compares, under the same Linf eps = 0.1 AutoAttack:
    undefended    the standard WRN-16-1, AutoAttack `standard`
    adv-trained   the same WRN-16-1 trained with PGD (Madry et al.), AutoAttack `standard`
    diffpure      the standard WRN-16-1 behind DiffPure (t* = 0.1), AutoAttack `--version`
                  (default `rand`) through the `--grad` gradient (default `adjoint`, the paper's)
and prints one table, each row with its protocol. The defaults are a reduced protocol sized for a
small CPU (32 test images, dt = 1e-2, EOT 2, 10 iterations, 500 Square queries). Flags scale it to
the full protocol, e.g.

    python -m experiments.fashion_mnist_autoattack --n-examples 512 --dt 1e-3 --eot 20 \\
        --n-iter 100 --n-queries 5000 --version rand   # and with --version standard

`--rows diffpure --grad exact --protocols one_draw worst_of_10 majority_of_10` runs the honest,
exact-gradient evaluation with the stricter protocols. Every row is resumable: each has its own
workdir under --workdir (named by its settings), and a rerun with the same flags continues.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os

from diffpure_jax.data import fashion_mnist_test

from .attack_cli import (
    DatasetDefaults,
    add_attack_flags,
    evaluate,
    initialize,
    load_data,
    resolve,
    settings,
)

FASHION_MNIST = DatasetDefaults(
    label="Fashion-MNIST",
    load=fashion_mnist_test,
    classifier="checkpoints/fmnist-wrn-16-1",
    score="checkpoints/fmnist-ncsnpp-small",
    eps={"Linf": 0.1, "L2": 1.5, "L1": 10.0},
    t_star={"Linf": 0.1, "L2": 0.1, "L1": 0.1},
    n_examples=32,
    dt=1e-2,
    batch_size=32,
    n_queries=500,
    eot=2,
    n_iter=10,
    unroll=False,
    data_dir_help="directory of the Fashion-MNIST IDX files (default /usr/share/datasets/...)",
    checkpoint_hint=(
        "The Fashion-MNIST checkpoints ship in checkpoints/; retrain one with "
        "python -m experiments.train_classifier or python -m experiments.train_score."
    ),
)
ROWS = ("undefended", "adv-trained", "diffpure")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.fashion_mnist_autoattack", description=__doc__.splitlines()[0]
    )
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--classifier", default=FASHION_MNIST.classifier)
    p.add_argument("--adv-classifier", default="checkpoints/fmnist-wrn-16-1-pgd")
    p.add_argument("--score", default=FASHION_MNIST.score)
    p.add_argument(
        "--undefended-version",
        choices=["standard", "rand"],
        default="standard",
        help="AutoAttack version for the undefended and adv-trained rows",
    )
    p.add_argument("--workdir", default="workdir/fmnist", help="one subdirectory per row")
    add_attack_flags(p, FASHION_MNIST)
    return p


def row_args(args, row: str):
    """The resolved flags of one row (a copy of args)."""
    a = copy.copy(args)
    if row == "diffpure":
        a.defense = "diffpure"
    else:
        a.defense = "none"
        a.classifier = args.adv_classifier if row == "adv-trained" else args.classifier
        # A deterministic model: no EOT, one draw is every draw, no purification settings.
        a.version, a.eot, a.protocols = args.undefended_version, None, ["one_draw"]
        a.attack, a.grad, a.t_star, a.dt, a.score = "autoattack", None, None, None, None
    return a


def row_workdir(root: str, row: str, a) -> str:
    digest = hashlib.sha256(json.dumps(settings(a), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(root, f"{row}-{digest}")


def describe(row: str, a) -> tuple[str, str]:
    classifier = os.path.basename(os.path.normpath(a.classifier))  # e.g. fmnist-wrn-16-1-pgd
    if a.defense == "none":
        return classifier, f"AutoAttack {a.version}"
    attack = {
        "autoattack": f"AutoAttack {a.version}",
        "pgd-eot": "PGD-EOT",
        "pgd-eot-final": "PGD-EOT (final iterate)",
        "bpda-eot": "BPDA+EOT",
    }
    eot = f", EOT {a.eot}" if a.eot and a.attack != "bpda-eot" else ""
    model = f"DiffPure (t*={a.t_star}, dt={a.dt}) + {classifier}"
    return model, f"{attack[a.attack]}{eot}, {a.grad}"


def comparison_table(rows: list[tuple[str, object, dict]]) -> str:
    lines = [
        "| row | model | attack, gradient | protocol | examples | clean (%) | robust (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, a, summary in rows:
        model, attack = describe(row, a)
        for protocol, robust in summary["robust_accuracy"].items():
            lines.append(
                f"| {row} | {model} | {attack} | {protocol} | {summary['n_examples']} | "
                f"{summary['clean_accuracy']:.1f} | {robust:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None, after_batch=None) -> str:
    args = build_parser().parse_args(argv)
    initialize(args)
    resolve(args, FASHION_MNIST)
    data = None
    done = []
    for row in args.rows:
        a = row_args(args, row)
        workdir = row_workdir(args.workdir, row, a)
        data = data or load_data(args, FASHION_MNIST)
        summary = evaluate(a, FASHION_MNIST, workdir, data, after_batch)
        done.append((row, a, summary))
    threat = f"{args.norm} eps = {args.eps:g}"
    table = f"Fashion-MNIST test subset (data seed {args.data_seed}), {threat}\n\n"
    table += comparison_table(done)
    print(table)
    print(f"per-example records and summaries: {args.workdir}/<row>-<settings hash>/")
    return table


if __name__ == "__main__":
    main()
