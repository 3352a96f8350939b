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
from collections.abc import Callable, Sequence
from typing import NamedTuple

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
from diffpure_jax.attacks.autoattack import ATTACKS, LIU_PROTOCOLS, VERSIONS, autoattack_config
from diffpure_jax.attacks.base import THREATS, Threat
from diffpure_jax.checkpoint import CheckpointError, read_config
from diffpure_jax.data import (
    DataNotFoundError,
    celebahq_val,
    cifar10_test,
    fashion_mnist_test,
    imagenet_val,
)
from diffpure_jax.ddpm import DDPMConfig
from diffpure_jax.load import DDPM_PARAMETERIZATION, check_checkpoint
from diffpure_jax.protocols import parse_protocols
from diffpure_jax.runner import Evaluation, markdown_table, run_evaluation
from diffpure_jax.score import SCORE_DTYPES
from diffpure_jax.workdir import changed_settings

from .config import UsageError, field, identity, parse_fraction, run_dir


class TestSet(NamedTuple):
    label: str  # "CIFAR-10"
    # (n, seed, data_dir, **options) -> (x (n, H, W, C) in [0, 1], y (n,), index (n,))
    load: Callable
    size: int | None  # images in the test set (None: known once the local copy is read)
    options: tuple[str, ...] = ()  # run fields passed to `load` by name (e.g. "attribute")


# A new dataset adds one entry (and its loader in diffpure_jax.data).
TEST_SETS: dict[str, TestSet] = {
    "cifar10": TestSet("CIFAR-10", cifar10_test, 10_000),
    "fashion_mnist": TestSet("Fashion-MNIST", fashion_mnist_test, 10_000),
    "imagenet": TestSet("ImageNet validation", imagenet_val, 50_000),
    "celebahq": TestSet("CelebA-HQ validation", celebahq_val, None, ("attribute",)),
}
ATTACK_NAMES = (
    "autoattack", "pgd-eot", "pgd-eot-final", "bpda-eot", "stadv", "diffattack", "diffhammer"
)  # fmt: skip
APGD_FAMILY = ("autoattack", "diffattack")  # attacks built from an AutoAttack version


@dataclasses.dataclass(frozen=True)
class AttackRun:
    """One evaluation. Fields with `identity=False` do not change results."""

    dataset: str = field("cifar10", choices=tuple(TEST_SETS), cli=False)
    classifier: str = field("checkpoints/cifar10-wrn-28-10", help="classifier checkpoint")
    score: str | None = field("checkpoints/cifar10-ddpmpp-deep-cont", help="score checkpoint")
    defense: str = field("diffpure", choices=("diffpure", "none"))
    norm: str = field(
        "Linf",
        choices=THREATS,
        help="StAdv: the flow bound of --attack stadv, in normalised grid units (DiffPure: "
        "--attack stadv --norm StAdv --eps 0.05)",
    )
    eps: float = field(8 / 255, parse=parse_fraction, help="threat radius; 8/255 is accepted")
    t_star: float | None = field(0.1, help="diffusion time of the purifier")
    dt: float | None = field(1e-3, help="reverse step; must divide t*")
    grad: str | None = field("adjoint", choices=GRAD_MODES, help="gradient through the purifier")
    input_size: int | None = field(
        None,
        identity="changed",
        help="side of the classifier's images when the score model's differs (ImageNet: 224 "
        "around the 256 ADM, resized bilinearly in and out)",
    )
    score_dtype: str = field(
        "float32",
        choices=SCORE_DTYPES,
        identity="changed",
        help="the score network's compute dtype (bfloat16: the official fp16 torso's analogue)",
    )
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
        "point for worst_of_N / majority_of_N; stadv is DiffPure's StAdv (needs --norm StAdv); "
        "diffattack: the --version's APGD attacks plus DiffAttack's deviated-reconstruction "
        "loss; diffhammer: DiffHammer's selective EM attack with gradient grafting",
    )
    version: str = field(
        "rand",
        choices=VERSIONS,
        help="AutoAttack; liu: Liu et al.'s protocol as DiffBreak quotes it (APGD-CE, 20 "
        "iterations, EOT 10; with --grad exact), judged over 20 final draws (sets --protocols "
        "to one_draw worst_of_20 majority_of_20 average_of_20 unless others are given)",
    )
    attacks: tuple[str, ...] | None = field(None, choices=ATTACKS, help="for --version custom")
    eot: int | None = field(None, help="EOT draws (none: the attack version's own)")
    eot_chunk: int | None = field(
        None,
        identity=False,
        help="EOT draws per vmapped call, their gradients summed (none: all at once); bounds "
        "the memory of large-EOT attacks, same results",
    )
    n_iter: int | None = field(None, help="attack iterations (none: the attack's own)")
    apgd_restarts: int | None = field(
        None,
        identity="changed",
        help="AutoAttack's APGD-CE and APGD-DLR restarts (none: the version's own, 5 for "
        "custom as the reference, 1 for standard and rand, 5 for standard L1)",
    )
    fab_restarts: int | None = field(
        None,
        identity="changed",
        help="AutoAttack's untargeted FAB restarts (none: the version's own, 5 for custom as "
        "the reference, else 1)",
    )
    dev_steps: int = field(
        10,
        identity="changed",
        help="diffattack: reverse steps of the deviated-reconstruction loss, spread evenly",
    )
    dev_weight: float = field(
        1.0, identity="changed", help="diffattack: lambda, the weight of that loss (paper: 1)"
    )
    n_eval: int = field(
        10,
        identity="changed",
        help="diffhammer: purification draws scored at every iteration (its N-evaluation)",
    )
    recheck: int | None = field(
        None,
        identity="changed",
        help="draws re-checking each point an EOT attack broke (pgd-eot, bpda-eot; none: the "
        "attack's own, 150 for bpda-eot)",
    )
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

    def __post_init__(self):
        if self.attack == "bpda-eot" and self.grad != "bpda":
            if self.grad is not None:
                print(
                    "note: --attack bpda-eot uses BPDA gradients; setting --grad bpda",
                    file=sys.stderr,
                )
            object.__setattr__(self, "grad", "bpda")
        liu = self.attack == "autoattack" and self.version == "liu"
        if liu and self.protocols == ("one_draw",):  # the default: the preset's own protocols
            print(
                f"note: --version liu is judged with --protocols {' '.join(LIU_PROTOCOLS)}",
                file=sys.stderr,
            )
            object.__setattr__(self, "protocols", LIU_PROTOCOLS)
        if self.version == "custom" and not self.attacks:
            raise ValueError("--version custom needs --attacks, e.g. --attacks apgd-ce square")
        if self.attack == "diffhammer" and self.eot is not None:
            raise ValueError(
                "--attack diffhammer scores --n-eval draws per iteration and backpropagates one "
                "(gradient grafting); --eot does not apply"
            )
        restarts = self.apgd_restarts is not None or self.fab_restarts is not None
        if restarts and self.attack not in APGD_FAMILY:
            raise ValueError(
                f"--apgd-restarts and --fab-restarts apply to autoattack and diffattack, not "
                f"{self.attack}"
            )
        if self.recheck is not None and self.attack not in ("pgd-eot", "pgd-eot-final", "bpda-eot"):
            raise ValueError(
                f"--recheck applies to pgd-eot, pgd-eot-final and bpda-eot, not {self.attack}"
            )
        if (self.attack == "stadv") != (self.norm == "StAdv"):
            raise ValueError(
                f"--attack {self.attack} with --norm {self.norm}: StAdv's flow threat goes with "
                "its attack alone; pass --attack stadv --norm StAdv --eps 0.05 (DiffPure's bound)"
            )
        if self.norm == "StAdv" and not 0 < self.eps <= 2:
            raise ValueError(
                f"StAdv --eps is a grid offset in (0, 2] (grid in [-1, 1]): {self.eps:g}"
            )
        if self.norm == "Linf" and not 0 < self.eps <= 1:
            raise ValueError(f"Linf --eps must be in (0, 1] (images are in [0, 1]): {self.eps:g}")
        if not self.eps > 0:
            raise ValueError(f"--eps must be positive, got {self.eps:g}")
        size = TEST_SETS[self.dataset].size or self.n_examples
        if not 1 <= self.n_examples <= size:
            label = TEST_SETS[self.dataset].label
            raise ValueError(f"--n-examples must be in [1, {size}] ({label}): {self.n_examples}")
        counts = ("batch_size", "n_queries", "eot", "eot_chunk", "n_iter", "recheck")
        counts += ("dev_steps", "n_eval")
        for name in counts + ("apgd_restarts", "fab_restarts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        self.threat()
        if self.attack in ("diffattack", "diffhammer"):
            if self.defense != "diffpure":
                raise ValueError(f"--attack {self.attack} attacks a purifier: --defense diffpure")
            self.suite()  # refuses settings the attack cannot take (threat, version)
        parse_protocols(self.protocols)
        if self.defense == "diffpure":
            self.purify_config()

    def threat(self) -> Threat:
        return Threat(self.norm, self.eps)

    def purify_config(self) -> PurifyConfig:
        return PurifyConfig(
            t_star=self.t_star, dt=self.dt, grad=self.grad, unroll=self.unroll,
            input_size=self.input_size, score_dtype=self.score_dtype,
        )  # fmt: skip

    def undefended(self, classifier: str, version: str) -> AttackRun:
        """The same threat and data against a deterministic classifier: no purifier settings,
        no EOT, one draw is every draw (AutoAttack `version`; StAdv for the StAdv threat)."""
        stadv = self.norm == "StAdv"
        return dataclasses.replace(
            self, defense="none", classifier=classifier, version=version,
            eot=1 if stadv else None, protocols=("one_draw",),
            attack="stadv" if stadv else "autoattack", grad=None, t_star=None, dt=None,
            score=None, input_size=None, score_dtype="float32", recheck=None,
        )  # fmt: skip

    def autoattack_config(self):
        """The AutoAttack version's settings with this run's overrides (autoattack, diffattack)."""
        overrides = {"n_queries": self.n_queries}
        if self.eot is not None:
            overrides["n_eot"] = self.eot
        if self.eot_chunk is not None:
            overrides["eot_chunk"] = self.eot_chunk
        if self.n_iter is not None:
            overrides["n_iter"] = self.n_iter
        if self.apgd_restarts is not None:
            overrides["n_restarts"] = self.apgd_restarts
        if self.fab_restarts is not None:
            overrides["fab_restarts"] = self.fab_restarts
        if self.version == "custom":
            overrides["attacks"] = tuple(self.attacks)
        return autoattack_config(self.version, self.norm, **overrides)

    def suite(self):
        """The attack suite the runner calls on each batch."""
        threat = self.threat()
        if self.attack == "autoattack":
            return suites.autoattack_suite(threat, self.autoattack_config())
        if self.attack == "diffattack":
            return suites.diffattack_suite(
                threat, self.autoattack_config(), self.dev_steps, self.dev_weight
            )
        if self.attack == "diffhammer":
            n_iter = {} if self.n_iter is None else {"n_iter": self.n_iter}
            return suites.diffhammer_suite(threat, n_eval=self.n_eval, **n_iter)
        kwargs = {}
        if self.eot is not None:
            kwargs["n_eot"] = self.eot
        if self.eot_chunk is not None:
            kwargs["eot_chunk"] = self.eot_chunk
        if self.n_iter is not None:
            kwargs["n_iter"] = self.n_iter
        if self.recheck is not None:
            kwargs["recheck_draws"] = self.recheck
        if self.attack == "bpda-eot":
            return suites.bpda_eot_suite(threat, **kwargs)
        if self.attack == "stadv":
            return suites.stadv_suite(threat, **kwargs)
        if self.attack == "pgd-eot-final":
            kwargs["stop_at_success"] = False
        return suites.pgd_suite(threat, self.attack, **kwargs)


def load_data(run: AttackRun):
    """(x, y, index) of the run's test subset; a UsageError if the data is missing."""
    test_set = TEST_SETS[run.dataset]
    options = {name: getattr(run, name) for name in test_set.options}
    try:
        return test_set.load(run.n_examples, run.data_seed, run.data_dir, **options)
    except DataNotFoundError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # e.g. more images asked for than the local copy holds
        raise UsageError(str(e)) from None


def check_inputs(rows: Sequence[tuple[AttackRun, str]]) -> None:
    """Refuse, before any work and listing every problem at once, what would stop the runs
    (run, workdir) later: a missing checkpoint, missing data, a workdir that is a file or
    holds a run with other settings. Raises UsageError."""
    problems = []
    kinds = {}
    for run, _ in rows:
        kinds[run.classifier] = "classifier"
        if run.defense == "diffpure":
            kinds[run.score] = "score"
    for path, kind in kinds.items():
        try:
            check_checkpoint(path, kind)
        except CheckpointError as e:
            problems.append(str(e))
    for run, _ in rows:
        if run.defense == "diffpure" and not problems:
            problems.extend(_size_problems(run))
    for run in {(r.dataset, r.data_dir): r for r, _ in rows}.values():
        try:
            load_data(dataclasses.replace(run, n_examples=1, data_seed=0))
        except UsageError as e:
            problems.append(str(e))
    for run, workdir in rows:
        parent = os.path.dirname(os.path.normpath(workdir))
        if any(os.path.isfile(d) for d in (workdir, parent)):
            problems.append(f"--workdir {parent!r} is a file; pass a directory")
            continue
        changed = changed_settings(workdir, identity(run))
        if changed:
            problems.append(
                f"{workdir} holds a run with other settings ({', '.join(changed)}); it is kept"
            )
    if problems:
        raise UsageError("\n".join(dict.fromkeys(problems)))


def _size_problems(run: AttackRun) -> list[str]:
    """Why the purifier's settings do not fit its checkpoint (a DDPM chain's), or the classifier
    cannot take the purifier's output (their image sizes), if so."""
    saved = read_config(run.score, "score")
    if saved.get("parameterization") == DDPM_PARAMETERIZATION:
        steps = saved.get("ddpm", {}).get("num_timesteps", 1000)
        try:
            DDPMConfig.from_purify_config(run.purify_config(), steps)
        except ValueError as e:
            return [f"{run.score} is a DDPM chain: {e}"]
    wanted = tuple(read_config(run.classifier, "classifier")["input_shape"])
    score = tuple(saved["input_shape"])
    given = score if run.input_size is None else (run.input_size, run.input_size, score[-1])
    if given == wanted:
        return []
    fix = (
        f"pass --input-size {wanted[0]} (resized to the score model's {score[0]} and back)"
        if wanted[0] == wanted[1] and wanted[-1] == score[-1]
        else "use a classifier and a score model of the same image size"
    )
    return [
        f"the classifier {run.classifier} takes {wanted[0]}x{wanted[1]}x{wanted[2]} images but the "
        f"purifier returns {given[0]}x{given[1]}x{given[2]}: {fix}"
    ]


def load_model(run: AttackRun):
    """The classifier, purified when defense is diffpure (`check_inputs` first)."""
    classifier = load_classifier(run.classifier)
    if run.defense == "diffpure":
        return DefendedClassifier(load_purifier(run.score, run.purify_config()), classifier)
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
        f"{len(x)} {TEST_SETS[run.dataset].label} test images, {jax.local_device_count()} "
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


def run_single(run: AttackRun, after_batch=None) -> dict:
    """A dataset entry point's whole job for one config: check every input, then run (or
    resume) the evaluation into `run.workdir/<diffpure|undefended>-<hash>` and print its table."""
    workdir = run_dir(run.workdir, "diffpure" if run.defense == "diffpure" else "undefended", run)
    check_inputs([(run, workdir)])
    initialize(run)
    summary = evaluate(run, workdir, after_batch=after_batch)
    report(summary, workdir)
    return summary
