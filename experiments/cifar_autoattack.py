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
import fractions
import json
import os
import sys

import jax

from diffpure_jax import DefendedClassifier, load_classifier, load_purifier, sharding, undefended
from diffpure_jax.attacks.autoattack import ATTACKS, autoattack_config
from diffpure_jax.attacks.base import Threat
from diffpure_jax.data import DataNotFoundError, cifar10_test
from diffpure_jax.evaluate import (
    Evaluation,
    autoattack_suite,
    markdown_table,
    parse_protocols,
    pgd_suite,
    run_evaluation,
)

PAPER_T_STAR = {"Linf": 0.1, "L2": 0.075, "L1": 0.1}


def parse_eps(text: str) -> float:
    """'8/255' or '0.0314' -> float."""
    try:
        return float(fractions.Fraction(text))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(
            f"eps must be a number or a fraction like 8/255: {text!r}"
        ) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar_autoattack", description=__doc__.splitlines()[0]
    )
    p.add_argument("--classifier", default="checkpoints/cifar10-wrn-28-10")
    p.add_argument("--score", default="checkpoints/cifar10-ddpmpp-deep-cont")
    p.add_argument("--defense", choices=["diffpure", "none"], default="diffpure")
    p.add_argument("--norm", choices=["Linf", "L2", "L1"], default="Linf")
    p.add_argument("--eps", type=parse_eps, default=None, help="default 8/255 (Linf), 0.5 (L2)")
    p.add_argument("--t-star", type=float, default=None, help="default 0.1 (Linf), 0.075 (L2)")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--grad", choices=["exact", "adjoint", "bpda", "blind"], default="adjoint")
    p.add_argument("--attack", choices=["autoattack", "pgd-eot", "bpda-eot"], default="autoattack")
    p.add_argument("--version", choices=["standard", "rand", "custom"], default="rand")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, help="for --version custom")
    p.add_argument("--eot", type=int, default=None, help="EOT draws (default: the version's)")
    p.add_argument(
        "--n-iter", type=int, default=None, help="attack iterations (default: the attack's)"
    )
    p.add_argument("--n-queries", type=int, default=5000, help="Square queries")
    p.add_argument("--n-examples", type=int, default=512)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--protocols",
        nargs="+",
        default=["one_draw"],
        help="one_draw worst_of_N average_of_N majority_of_N",
    )
    p.add_argument("--workdir", default=None, help="default: workdir/cifar_<settings>")
    p.add_argument("--no-progress", action="store_true")
    multi = p.add_argument_group("several processes (hosts); these do not change results")
    multi.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS)"
    )
    multi.add_argument("--num-processes", type=int, default=None, help="(JAX_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, default=None, help="(JAX_PROCESS_ID)")
    return p


def settings(args) -> dict:
    """Every flag that changes results (the workdir's identity)."""
    keys = (
        "classifier", "score", "defense", "norm", "eps", "t_star", "dt", "grad", "attack",
        "version", "attacks", "eot", "n_iter", "n_queries", "n_examples", "data_seed",
        "batch_size", "seed", "protocols",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def make_attack(args, threat: Threat):
    if args.attack == "autoattack":
        overrides = {"n_queries": args.n_queries}
        if args.eot is not None:
            overrides["n_eot"] = args.eot
        if args.n_iter is not None:
            overrides["n_iter"] = args.n_iter
        if args.version == "custom":
            if not args.attacks:
                raise SystemExit("--version custom needs --attacks, e.g. --attacks apgd-ce square")
            overrides["attacks"] = tuple(args.attacks)
        return autoattack_suite(threat, autoattack_config(args.version, args.norm, **overrides))
    kwargs = {}
    if args.eot is not None:
        kwargs["n_eot"] = args.eot
    if args.n_iter is not None:
        kwargs["n_iter"] = args.n_iter
    if args.attack == "bpda-eot":
        kwargs = {
            "n_iter": 50, "step_size": 2 / 255, "n_eot": 15, "average": "logits",
            "random_start": False, "recheck_draws": 150, **kwargs,
        }  # fmt: skip
    return pgd_suite(threat, args.attack, **kwargs)


def main(argv=None, after_batch=None) -> dict:
    args = build_parser().parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    args.eps = (
        args.eps if args.eps is not None else {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}[args.norm]
    )
    args.t_star = args.t_star if args.t_star is not None else PAPER_T_STAR[args.norm]
    parse_protocols(args.protocols)
    if args.attack == "bpda-eot" and args.grad != "bpda":
        print("note: --attack bpda-eot uses BPDA gradients; setting --grad bpda", file=sys.stderr)
        args.grad = "bpda"
    threat = Threat(args.norm, args.eps)
    workdir = args.workdir or os.path.join(
        "workdir",
        f"cifar_{args.defense}_{args.attack}_{args.version}_{args.norm}_{args.grad}_t{args.t_star}",
    )
    try:
        x, y, index = cifar10_test(args.n_examples, args.data_seed, args.data_dir)
    except DataNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    for path in [args.classifier] + ([args.score] if args.defense == "diffpure" else []):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(
                f"error: no checkpoint at {path!r}. Convert the official weights first "
                "(see checkpoints/README.md), e.g. python -m diffpure_jax.convert robustbench-wrn "
                "Standard.pt checkpoints/cifar10-wrn-28-10"
            )
    classifier = load_classifier(args.classifier)
    if args.defense == "diffpure":
        purifier = load_purifier(args.score, t_star=args.t_star, dt=args.dt, grad=args.grad)
        model = DefendedClassifier(purifier, classifier)
    else:
        model = undefended(classifier)
    evaluation = Evaluation(
        attack=make_attack(args, threat),
        threat=threat,
        protocols=tuple(args.protocols),
        batch_size=args.batch_size,
        seed=args.seed,
        description=settings(args),
    )
    print(
        f"{len(x)} CIFAR-10 test images, {jax.local_device_count()} device(s) per process, "
        f"process {jax.process_index()} of {jax.process_count()}; workdir {workdir}"
    )
    summary = run_evaluation(
        evaluation, model, x, y, index, workdir, not args.no_progress, after_batch
    )
    print(markdown_table(summary))
    print(f"per-example records: {os.path.join(workdir, 'records.jsonl')}")
    print(json.dumps({k: summary[k] for k in ("clean_accuracy", "robust_accuracy")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
