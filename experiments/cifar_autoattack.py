"""AutoAttack (or PGD-EOT, BPDA+EOT) against DiffPure on CIFAR-10, resumable.

    python -m experiments.cifar_autoattack                       # the paper's CIFAR-10 Linf setting
    python -m experiments.cifar_autoattack --grad exact          # the honest, exact gradients
    python -m experiments.cifar_autoattack --version standard --protocols one_draw worst_of_10

Defaults follow the paper: WRN-28-10, Linf eps = 8/255, t* = 0.1 (0.075 for L2), dt = 1e-3, the
adjoint gradient it used, AutoAttack `rand` (EOT 20), and 512 test images chosen by --data-seed.
The paper reports the minimum over `rand` and `standard`, so run both. Killed and rerun with the
same flags, a run continues where it stopped; see diffpure_jax/evaluate.py.

Each batch is split over all local devices. To split the batches over several processes or hosts
sharing the workdir, start one process per host with the same flags plus
`--coordinator HOST:PORT --num-processes N --process-id I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; Slurm and Open MPI jobs are detected). The results do not
depend on the number of devices or processes.
"""

from __future__ import annotations

import argparse
import os

from diffpure_jax.data import cifar10_test

from .attack_cli import (
    DatasetDefaults,
    add_attack_flags,
    evaluate,
    initialize,
    parse_eps,
    report,
    resolve,
    settings,
)

__all__ = ["build_parser", "main", "parse_eps", "settings"]

CIFAR10 = DatasetDefaults(
    label="CIFAR-10",
    load=cifar10_test,
    classifier="checkpoints/cifar10-wrn-28-10",
    score="checkpoints/cifar10-ddpmpp-deep-cont",
    eps={"Linf": 8 / 255, "L2": 0.5, "L1": 12.0},
    t_star={"Linf": 0.1, "L2": 0.075, "L1": 0.1},
    n_examples=512,
    dt=1e-3,
    batch_size=64,
    n_queries=5000,
    eot=None,
    n_iter=None,
    unroll=False,
    data_dir_help="tensorflow-datasets data_dir",
    checkpoint_hint=(
        "Convert the official weights first (see checkpoints/README.md), e.g. "
        "python -m diffpure_jax.convert robustbench-wrn Standard.pt checkpoints/cifar10-wrn-28-10"
    ),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar_autoattack", description=__doc__.splitlines()[0]
    )
    p.add_argument("--classifier", default=CIFAR10.classifier)
    p.add_argument("--score", default=CIFAR10.score)
    p.add_argument("--defense", choices=["diffpure", "none"], default="diffpure")
    p.add_argument("--workdir", default=None, help="default: workdir/cifar_<settings>")
    add_attack_flags(p, CIFAR10)
    return p


def main(argv=None, after_batch=None) -> dict:
    args = build_parser().parse_args(argv)
    initialize(args)
    resolve(args, CIFAR10)
    workdir = args.workdir or os.path.join(
        "workdir",
        f"cifar_{args.defense}_{args.attack}_{args.version}_{args.norm}_{args.grad}_t{args.t_star}",
    )
    summary = evaluate(args, CIFAR10, workdir, after_batch=after_batch)
    report(summary, workdir)
    return summary


if __name__ == "__main__":
    main()
