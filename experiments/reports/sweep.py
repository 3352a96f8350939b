"""Clean and robust accuracy against t*, from evaluation workdirs, as one PNG.

    python -m experiments.reports.sweep --workdirs workdir/fmnist_sweep/diffpure-*

Reads each workdir's summary.json (`experiments.fashion_mnist_autoattack`): its t*, its clean
accuracy and its robust accuracy under every protocol; prints the points as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments.config import cli_main

from .common import pyplot, read_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reports.sweep", description=__doc__.splitlines()[0]
    )
    p.add_argument("--workdirs", nargs="+", required=True)
    p.add_argument("--title", default=None, help="default: the runs' settings")
    p.add_argument("--out", default="experiments/results/fashion_mnist_tstar_sweep.png")
    return p


def describe(settings: dict) -> str:
    """A plot title from a run's stored settings (its run_config.json), e.g. 'pgd-eot-final,
    exact grad., EOT 2, 10 iter., 32 images, 10 steps'."""
    steps = round(settings["t_star"] / settings["dt"])
    return (
        f"{settings['attack']}, {settings['grad']} grad., EOT {settings['eot']}, "
        f"{settings['n_iter']} iter., {settings['n_examples']} images, {steps} steps"
    )


@cli_main
def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    plt = pyplot()
    points = []
    for w in args.workdirs:
        summary = read_summary(w)
        t = summary["settings"]["t_star"]
        points.append((t, summary["clean_accuracy"], summary["robust_accuracy"]))
    points.sort()
    title = args.title or describe(summary["settings"])
    ts = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ts, [p[1] for p in points], "o-", label="clean (one draw)")
    for protocol in points[0][2]:
        ax.plot(ts, [p[2][protocol] for p in points], "s--", label=f"robust ({protocol})")
    ax.set_xlabel("t*")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    plt.close(fig)
    result = [{"t_star": t, "clean": c, "robust": r} for t, c, r in points]
    print(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
