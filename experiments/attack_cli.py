"""The command line shared by the AutoAttack experiments: flags, attack construction, one run.

A dataset entry point (`cifar_autoattack`, `fashion_mnist_autoattack`) supplies `DatasetDefaults`
and calls `build_parser` and `evaluate`. Killed and rerun with the same flags, a run continues where
it stopped (diffpure_jax/evaluate.py); the results do not depend on the number of devices or
processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import json
import os
import sys
from collections.abc import Callable

import jax

from diffpure_jax import DefendedClassifier, load_classifier, load_purifier, sharding, undefended
from diffpure_jax.attacks.autoattack import ATTACKS, autoattack_config
from diffpure_jax.attacks.base import Threat
from diffpure_jax.data import DataNotFoundError
from diffpure_jax.evaluate import (
    Evaluation,
    autoattack_suite,
    markdown_table,
    parse_protocols,
    pgd_suite,
    run_evaluation,
)

# Every flag that changes results (a workdir's identity).
SETTINGS = (
    "classifier", "score", "defense", "norm", "eps", "t_star", "dt", "grad", "attack",
    "version", "attacks", "eot", "n_iter", "n_queries", "n_examples", "data_seed",
    "batch_size", "seed", "protocols",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DatasetDefaults:
    """What differs between datasets: data, checkpoints and the paper-style defaults."""

    label: str  # "CIFAR-10"
    load: Callable  # (n, seed, data_dir) -> (x (n,H,W,C) in [0,1], y (n,), index (n,))
    classifier: str
    score: str
    eps: dict  # norm -> default eps
    t_star: dict  # norm -> default t*
    n_examples: int
    dt: float
    batch_size: int
    n_queries: int
    eot: int | None  # None: the attack version's own default
    n_iter: int | None
    unroll: bool  # PurifyConfig.unroll: faster exact/adjoint gradients of short solves on CPU
    data_dir_help: str
    checkpoint_hint: str  # how to get a missing checkpoint


def parse_eps(text: str) -> float:
    """'8/255' or '0.0314' -> float."""
    try:
        return float(fractions.Fraction(text))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(
            f"eps must be a number or a fraction like 8/255: {text!r}"
        ) from e


def add_attack_flags(p: argparse.ArgumentParser, d: DatasetDefaults) -> None:
    """Flags for the threat, the purifier, the attack, the data and the run (not the models)."""
    eps_help = ", ".join(f"{k} {v:.4g}" for k, v in d.eps.items())
    t_help = ", ".join(f"{k} {v}" for k, v in d.t_star.items())
    p.add_argument("--norm", choices=["Linf", "L2", "L1"], default="Linf")
    p.add_argument("--eps", type=parse_eps, default=None, help=f"default {eps_help}")
    p.add_argument("--t-star", type=float, default=None, help=f"default {t_help}")
    p.add_argument("--dt", type=float, default=d.dt)
    p.add_argument("--grad", choices=["exact", "adjoint", "bpda", "blind"], default="adjoint")
    p.add_argument(
        "--unroll",
        action=argparse.BooleanOptionalAction,
        default=d.unroll,
        help="compile the reverse steps unrolled (same values; faster gradients of short solves "
        "on CPU, longer compiles)",
    )
    p.add_argument(
        "--attack",
        choices=["autoattack", "pgd-eot", "pgd-eot-final", "bpda-eot"],
        default="autoattack",
        help="pgd-eot stops each example at its first success (a lucky draw can end it at a weak "
        "point); pgd-eot-final takes every step and is judged at the last iterate, the point for "
        "worst_of_N / majority_of_N",
    )
    p.add_argument("--version", choices=["standard", "rand", "custom"], default="rand")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, help="for --version custom")
    p.add_argument("--eot", type=int, default=d.eot, help="EOT draws (default: the version's)")
    p.add_argument(
        "--n-iter", type=int, default=d.n_iter, help="attack iterations (default: the attack's)"
    )
    p.add_argument("--n-queries", type=int, default=d.n_queries, help="Square queries")
    p.add_argument("--n-examples", type=int, default=d.n_examples)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help=d.data_dir_help)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--protocols",
        nargs="+",
        default=["one_draw"],
        help="one_draw worst_of_N average_of_N majority_of_N",
    )
    p.add_argument("--no-progress", action="store_true")
    multi = p.add_argument_group("several processes (hosts); these do not change results")
    multi.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS)"
    )
    multi.add_argument("--num-processes", type=int, default=None, help="(JAX_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, default=None, help="(JAX_PROCESS_ID)")


def settings(args) -> dict:
    """Every flag that changes results (the workdir's identity)."""
    return {k: getattr(args, k) for k in SETTINGS}


def resolve(args, d: DatasetDefaults):
    """Fill the norm-dependent defaults and reconcile --attack with --grad (in place)."""
    args.eps = args.eps if args.eps is not None else d.eps[args.norm]
    args.t_star = args.t_star if args.t_star is not None else d.t_star[args.norm]
    parse_protocols(args.protocols)
    if args.attack == "bpda-eot" and args.grad != "bpda":
        print("note: --attack bpda-eot uses BPDA gradients; setting --grad bpda", file=sys.stderr)
        args.grad = "bpda"
    return args


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
    if args.attack == "pgd-eot-final":
        kwargs["stop_at_success"] = False
    if args.attack == "bpda-eot":
        kwargs = {
            "n_iter": 50, "step_size": 2 / 255, "n_eot": 15, "average": "logits",
            "random_start": False, "recheck_draws": 150, **kwargs,
        }  # fmt: skip
    return pgd_suite(threat, args.attack, **kwargs)


def load_data(args, d: DatasetDefaults):
    try:
        return d.load(args.n_examples, args.data_seed, args.data_dir)
    except DataNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def load_model(args, d: DatasetDefaults):
    """The classifier, purified when --defense diffpure; a clear exit if a checkpoint is missing."""
    for path in [args.classifier] + ([args.score] if args.defense == "diffpure" else []):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"error: no checkpoint at {path!r}. {d.checkpoint_hint}")
    classifier = load_classifier(args.classifier)
    if args.defense == "diffpure":
        purifier = load_purifier(
            args.score, t_star=args.t_star, dt=args.dt, grad=args.grad, unroll=args.unroll
        )
        return DefendedClassifier(purifier, classifier)
    return undefended(classifier)


def evaluate(args, d: DatasetDefaults, workdir: str, data=None, after_batch=None) -> dict:
    """Run (or resume) one evaluation described by resolved `args`; returns its summary."""
    x, y, index = data if data is not None else load_data(args, d)
    threat = Threat(args.norm, args.eps)
    evaluation = Evaluation(
        attack=make_attack(args, threat),
        threat=threat,
        protocols=tuple(args.protocols),
        batch_size=args.batch_size,
        seed=args.seed,
        description=settings(args),
    )
    print(
        f"{len(x)} {d.label} test images, {jax.local_device_count()} device(s) per process, "
        f"process {jax.process_index()} of {jax.process_count()}; workdir {workdir}"
    )
    return run_evaluation(
        evaluation, load_model(args, d), x, y, index, workdir, not args.no_progress, after_batch
    )


def report(summary: dict, workdir: str) -> None:
    print(markdown_table(summary))
    print(f"per-example records: {os.path.join(workdir, 'records.jsonl')}")
    print(json.dumps({k: summary[k] for k in ("clean_accuracy", "robust_accuracy")}, indent=1))


def initialize(args) -> None:
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
