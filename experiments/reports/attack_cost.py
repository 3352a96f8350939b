"""Robust accuracy and cost per example of evaluation workdirs, as one Markdown table.

    python -m experiments.reports.attack_cost --workdirs workdir/fmnist_strongest/diffpure-*

Reads each workdir's summary.json (its settings and robust accuracy per protocol) and its
timings (`diffpure_jax.runner.seconds_per_example`: wall seconds per example of the batches
after each sitting's first, which includes compilation); prints the table and, with --out,
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffpure_jax.runner import seconds_per_example
from experiments.config import cli_main

from .common import read_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.attack_cost", description=__doc__.splitlines()[0]
    )
    p.add_argument("--workdirs", nargs="+", required=True)
    p.add_argument("--out", default=None, help="write the rows as JSON")
    return p


def attack_label(settings: dict) -> str:
    """e.g. 'autoattack rand, EOT 16, 5 iter.' from a run's stored settings."""
    attack = settings.get("attack", "?")
    version = settings.get("version", "")
    label = f"{attack} {version}" if attack == "autoattack" else attack
    if attack == "diffattack":
        label += f" ({version}, {settings.get('dev_steps', 10)} steps of L_dev)"
    if attack == "diffhammer":
        label += f" (N = {settings.get('n_eval', 10)})"
    elif settings.get("eot"):
        label += f", EOT {settings['eot']}"
    if settings.get("n_iter"):
        label += f", {settings['n_iter']} iter."
    return label


@cli_main
def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    rows = []
    for workdir in args.workdirs:
        summary = read_summary(workdir)
        cost = seconds_per_example(workdir)
        rows.append(
            {
                "workdir": os.path.normpath(workdir),
                "attack": attack_label(summary["settings"]),
                "n_examples": summary["n_examples"],
                "clean_accuracy": summary["clean_accuracy"],
                "robust_accuracy": summary["robust_accuracy"],
                "seconds_per_example": cost,
            }
        )
    protocols = sorted({p for r in rows for p in r["robust_accuracy"]})
    lines = [
        "| attack | examples | clean (%) | " + " | ".join(f"{p} (%)" for p in protocols)
        + " | s / example |",
        "|---" * (4 + len(protocols)) + "|",
    ]  # fmt: skip
    for r in rows:
        acc = [f"{r['robust_accuracy'][p]:.1f}" if p in r["robust_accuracy"] else "-"
               for p in protocols]  # fmt: skip
        cost = "-" if r["seconds_per_example"] is None else f"{r['seconds_per_example']:.1f}"
        lines.append(
            f"| {r['attack']} | {r['n_examples']} | {r['clean_accuracy']:.1f} | "
            + " | ".join(acc) + f" | {cost} |"
        )  # fmt: skip
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
