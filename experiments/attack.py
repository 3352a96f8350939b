"""One attack evaluation as a config (`AttackRun`), and running it.

`AttackRun` is every setting of one evaluation: data, models, threat, purifier, attack, protocols
and the run's layout. It builds the library's validated objects (`Threat`, `PurifyConfig`,
`AutoAttackConfig`, an attack suite), so a bad value is refused before any work starts. The
dataset entry points (`cifar_autoattack`, `fashion_mnist_autoattack`) take their `AttackRun`
from a config in `experiments/configs/`; killed and rerun with the same identity, a run
continues where it stopped (`diffpure_jax.runner`), and its results do not depend on the number
of devices or processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

import jax

from diffpure_jax import (
    GRAD_MODES,
    DefendedClassifier,
    PurifyConfig,
    load_classifier,
    load_purifier,
    sharding,
    undefended,
)
from diffpure_jax.attacks import suites
from diffpure_jax.attacks.autoattack import ATTACKS, autoattack_config
from diffpure_jax.attacks.base import NORMS, Threat
from diffpure_jax.data import DataNotFoundError, cifar10_test, fashion_mnist_test
from diffpure_jax.protocols import parse_protocols
from diffpure_jax.runner import Evaluation, markdown_table, run_evaluation

from .config import field, identity, parse_fraction

# name -> (label, test-set loader (n, seed, data_dir) -> (x, y, index)); a new dataset adds one.
TEST_SETS: dict[str, tuple[str, Callable]] = {
    "cifar10": ("CIFAR-10", cifar10_test),
    "fashion_mnist": ("Fashion-MNIST", fashion_mnist_test),
}
ATTACK_NAMES = ("autoattack", "pgd-eot", "pgd-eot-final", "bpda-eot")


@dataclasses.dataclass(frozen=True)
class AttackRun:
    """One evaluation. Fields with `identity=False` do not change results."""

    dataset: str = field("cifar10", choices=tuple(TEST_SETS), cli=False)
    classifier: str = field("checkpoints/cifar10-wrn-28-10", help="classifier checkpoint")
    score: str | None = field("checkpoints/cifar10-ddpmpp-deep-cont", help="score checkpoint")
    defense: str = field("diffpure", choices=("diffpure", "none"))
    norm: str = field("Linf", choices=NORMS)
    eps: float = field(8 / 255, parse=parse_fraction, help="threat radius; 8/255 is accepted")
    t_star: float | None = field(0.1, help="diffusion time of the purifier")
    dt: float | None = field(1e-3, help="reverse step; must divide t*")
    grad: str | None = field("adjoint", choices=GRAD_MODES, help="gradient through the purifier")
    unroll: bool = field(
        False,
        identity=False,
        help="compile the reverse steps unrolled (same values; faster gradients of short "
        "solves on CPU, longer compiles)",
    )
    attack: str = field(
        "autoattack",
        choices=ATTACK_NAMES,
        help="pgd-eot stops each example at its first success (a lucky draw can end it at a "
        "weak point); pgd-eot-final takes every step and is judged at the last iterate, the "
        "point for worst_of_N / majority_of_N",
    )
    version: str = field("rand", choices=("standard", "rand", "custom"), help="AutoAttack")
    attacks: tuple[str, ...] | None = field(None, choices=ATTACKS, help="for --version custom")
    eot: int | None = field(None, help="EOT draws (none: the attack version's own)")
    n_iter: int | None = field(None, help="attack iterations (none: the attack's own)")
    n_queries: int = field(5000, help="Square queries")
    n_examples: int = field(512, help="test images, a seeded subset")
    data_seed: int = field(0, help="seed of the test subset")
    batch_size: int = field(64)
    seed: int = field(0, help="seed of the attacks' and the purifier's noise")
    protocols: tuple[str, ...] = field(
        ("one_draw",), help="one_draw worst_of_N average_of_N majority_of_N"
    )
    data_dir: str | None = field(None, identity=False, help="where the dataset is")
    workdir: str = field("workdir/cifar_autoattack", identity=False, help="runs go in here")
    progress: bool = field(True, identity=False, help="progress bars")
    coordinator: str | None = field(
        None, identity=False, help="HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS)"
    )
    num_processes: int | None = field(None, identity=False, help="(JAX_NUM_PROCESSES)")
    process_id: int | None = field(None, identity=False, help="(JAX_PROCESS_ID)")
    checkpoint_hint: str = field("", identity=False, cli=False)  # how to get a missing checkpoint

    def __post_init__(self):
        if self.attack == "bpda-eot" and self.grad != "bpda":
            if self.grad is not None:
                print(
                    "note: --attack bpda-eot uses BPDA gradients; setting --grad bpda",
                    file=sys.stderr,
                )
            object.__setattr__(self, "grad", "bpda")
        if self.version == "custom" and not self.attacks:
            raise ValueError("--version custom needs --attacks, e.g. --attacks apgd-ce square")
        self.threat()
        parse_protocols(self.protocols)
        if self.defense == "diffpure":
            self.purify_config()

    def threat(self) -> Threat:
        return Threat(self.norm, self.eps)

    def purify_config(self) -> PurifyConfig:
        return PurifyConfig(t_star=self.t_star, dt=self.dt, grad=self.grad, unroll=self.unroll)

    def undefended(self, classifier: str, version: str) -> AttackRun:
        """The same threat and data against a deterministic classifier: no purifier settings,
        no EOT, one draw is every draw."""
        return dataclasses.replace(
            self, defense="none", classifier=classifier, version=version, eot=None,
            protocols=("one_draw",), attack="autoattack", grad=None, t_star=None, dt=None,
            score=None,
        )  # fmt: skip

    def suite(self):
        """The attack suite the runner calls on each batch."""
        threat = self.threat()
        if self.attack == "autoattack":
            overrides = {"n_queries": self.n_queries}
            if self.eot is not None:
                overrides["n_eot"] = self.eot
            if self.n_iter is not None:
                overrides["n_iter"] = self.n_iter
            if self.version == "custom":
                overrides["attacks"] = tuple(self.attacks)
            return suites.autoattack_suite(
                threat, autoattack_config(self.version, self.norm, **overrides)
            )
        kwargs = {}
        if self.eot is not None:
            kwargs["n_eot"] = self.eot
        if self.n_iter is not None:
            kwargs["n_iter"] = self.n_iter
        if self.attack == "bpda-eot":
            return suites.bpda_eot_suite(threat, **kwargs)
        if self.attack == "pgd-eot-final":
            kwargs["stop_at_success"] = False
        return suites.pgd_suite(threat, self.attack, **kwargs)


def load_data(run: AttackRun):
    """(x, y, index) of the run's test subset; a clear exit if the data is missing."""
    try:
        return TEST_SETS[run.dataset][1](run.n_examples, run.data_seed, run.data_dir)
    except DataNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def load_model(run: AttackRun):
    """The classifier, purified when defense is diffpure; a clear exit if a checkpoint is
    missing."""
    for path in [run.classifier] + ([run.score] if run.defense == "diffpure" else []):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"error: no checkpoint at {path!r}. {run.checkpoint_hint}")
    classifier = load_classifier(run.classifier)
    if run.defense == "diffpure":
        c = run.purify_config()
        purifier = load_purifier(run.score, t_star=c.t_star, dt=c.dt, grad=c.grad, unroll=c.unroll)
        return DefendedClassifier(purifier, classifier)
    return undefended(classifier)


def evaluate(run: AttackRun, workdir: str, data=None, after_batch=None) -> dict:
    """Run (or resume) one evaluation into `workdir`; returns its summary."""
    x, y, index = data if data is not None else load_data(run)
    evaluation = Evaluation(
        attack=run.suite(),
        threat=run.threat(),
        protocols=tuple(run.protocols),
        batch_size=run.batch_size,
        seed=run.seed,
        description=identity(run),
    )
    print(
        f"{len(x)} {TEST_SETS[run.dataset][0]} test images, {jax.local_device_count()} "
        f"device(s) per process, process {jax.process_index()} of {jax.process_count()}; "
        f"workdir {workdir}"
    )
    return run_evaluation(
        evaluation, load_model(run), x, y, index, workdir, run.progress, after_batch
    )


def report(summary: dict, workdir: str) -> None:
    print(markdown_table(summary))
    print(f"per-example records: {os.path.join(workdir, 'records.jsonl')}")
    print(json.dumps({k: summary[k] for k in ("clean_accuracy", "robust_accuracy")}, indent=1))


def initialize(run: AttackRun) -> None:
    """jax.distributed for a multi-process run (a no-op for one process)."""
    sharding.initialize_distributed(run.coordinator, run.num_processes, run.process_id)
