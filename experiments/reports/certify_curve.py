"""Certified accuracy against the L2 radius, from certification workdirs, as one PNG and a table.

    python -m experiments.reports.certify_curve --workdirs workdir/fmnist_certify/certify-*

Reads each workdir of `experiments.certify` (its run_config.json and per-example records): one
curve per run (per sigma), the fraction of the test images certified correct at each radius.
Prints a Markdown table (certified accuracy at `--radii`, the abstention rate, the smoothed
classifier's accuracy, n0, n, the largest radius n samples can certify and the noise samples
counted per second); `--json` writes its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from diffpure_jax.certify import (
    certified_accuracy,
    noise_samples_per_second,
    normal_ppf,
    summarize,
)
from diffpure_jax.runner import read_records
from diffpure_jax.workdir import RUN_CONFIG
from experiments.config import UsageError, cli_main

from .common import pyplot, write_json

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.certify_curve", description=__doc__.splitlines()[0]
    )
    p.add_argument("--workdirs", nargs="+", required=True, help="experiments.certify run dirs")
    p.add_argument("--radii", nargs="+", type=float, default=RADII, help="the table's radii")
    p.add_argument("--title", default=None, help="default: the runs' models and sample counts")
    p.add_argument("--out", default="experiments/results/fashion_mnist_certified.png")
    p.add_argument("--json", default=None, help="write the table's numbers as JSON")
    return p


def read_run(workdir: str) -> tuple[dict, list[dict]]:
    """(settings, records sorted by index) of a certification workdir."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise UsageError(f"{workdir} is not a certification workdir (no {RUN_CONFIG})")
    with open(path) as f:
        settings = json.load(f)
    if "n0" not in settings or "sigma" not in settings:
        raise UsageError(f"{workdir} holds no certification run (python -m experiments.certify)")
    records = sorted(read_records(workdir), key=lambda r: r["index"])
    if not records:
        raise UsageError(f"{workdir} has no records yet")
    return settings, records


def max_radius(settings: dict) -> float:
    """The largest radius the run's n samples can certify, sigma Phi^-1(alpha^(1/n))."""
    return settings["sigma"] * normal_ppf(settings["alpha"] ** (1.0 / settings["n"]))


def row(workdir: str, settings: dict, records: list[dict], radii) -> dict:
    """One run's numbers (percentages): certified accuracy at each radius and the rest."""
    summary = summarize(records, tuple(radii))
    rate = noise_samples_per_second(workdir)
    return {
        "workdir": workdir,
        "sigma": settings["sigma"],
        "n_examples": summary["n_examples"],
        "n0": settings["n0"],
        "n": settings["n"],
        "alpha": settings["alpha"],
        "max_radius": max_radius(settings),
        "certified_accuracy": {r: 100 * a for r, a in summary["certified_accuracy"].items()},
        "abstention_rate": 100 * summary["abstention_rate"],
        "accuracy": 100 * summary["accuracy"],
        "noise_samples_per_second": rate,
        "settings": settings,
    }


def markdown(rows: list[dict], radii) -> str:
    head = " | ".join(f"r = {r:g}" for r in radii)
    lines = [
        f"| sigma | images | n0 | n | {head} | abstained | accuracy | max radius | samples/s |",
        "|---" * (8 + len(radii)) + "|",
    ]
    for r in rows:
        acc = " | ".join(f"{a:.1f}" for a in r["certified_accuracy"].values())
        rate = r["noise_samples_per_second"]
        lines.append(
            f"| {r['sigma']:g} | {r['n_examples']} | {r['n0']} | {r['n']} | {acc} | "
            f"{r['abstention_rate']:.1f} | {r['accuracy']:.1f} | {r['max_radius']:.2f} | "
            + (f"{rate:.0f}" if rate else "n/a")
            + " |"
        )
    return "\n".join(lines) + "\n"


def describe(settings: dict) -> str:
    """A plot title from a run's settings, e.g. 'fmnist-wrn-16-1 behind fmnist-ncsnpp-small
    (one-shot), alpha 0.001'."""
    classifier = os.path.basename(os.path.normpath(settings["classifier"]))
    if settings.get("score") is None:
        return f"randomized smoothing of {classifier}, alpha {settings['alpha']:g}"
    score = os.path.basename(os.path.normpath(settings["score"]))
    how = f"DensePure x{settings['n_reverse']}" if settings.get("n_reverse") else "one-shot"
    return f"{classifier} behind {score} ({how}), alpha {settings['alpha']:g}"


@cli_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    plt = pyplot()
    runs = sorted(((w, *read_run(w)) for w in args.workdirs), key=lambda run: run[1]["sigma"])
    rows = [row(w, settings, records, args.radii) for w, settings, records in runs]
    fig, ax = plt.subplots(figsize=(4.8, 3.3))
    for r, (_, _, records) in zip(rows, runs, strict=True):
        top = max(r["max_radius"], max(args.radii)) * 1.02
        grid = np.linspace(0.0, top, 400)
        curve = 100 * certified_accuracy(records, grid)
        label = (
            f"sigma = {r['sigma']:g} ({r['n_examples']} images, n = {r['n']:,}: "
            f"radius <= {r['max_radius']:.2f})"
        )
        ax.plot(grid, curve, drawstyle="steps-post", label=label)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(args.title or describe(rows[0]["settings"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    plt.close(fig)
    table = markdown(rows, args.radii)
    result = {"radii": list(args.radii), "runs": rows, "table": table}
    write_json(result, args.json)
    print(table)
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
