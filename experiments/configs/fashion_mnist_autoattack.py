"""DiffPure on Fashion-MNIST, the embedded default (`experiments.fashion_mnist_autoattack`).

Words of `--config` (comma-separated; one study, one protocol size):

* the study: `main` (default: the undefended and PGD-trained classifiers under AutoAttack
  `standard`; DiffPure under AutoAttack `rand` through the paper's adjoint gradient (`diffpure`);
  and DiffPure under PGD-EOT with exact gradients judged at the final iterate, by one draw and
  by the worst and the majority of 10 purifications (`diffpure-final`); `--rows` adds
  `diffpure-exact`, AutoAttack `rand` through the exact gradient), or one run of the results page
  (experiments/results/fashion_mnist.md): `undefended` (the two classifiers at full AutoAttack
  strength), `adjoint`, `exact` (AutoAttack rand), `pgd`, `pgd-final`, `bpda` and `sweep`
  (PGD-EOT at the final iterate for t* in 0.05, 0.1, 0.2, 0.3, each with the same number of
  reverse steps) and `unseen` (the paper's unseen-threat study: DiffPure with exact gradients
  and the PGD-trained classifier under the norm word's threat, `Linf`, `L2` or `StAdv`) and
  `strongest` (DiffPure with exact gradients under the literature's strongest attacks, on 64
  images: AutoAttack rand, PGD-EOT at the final iterate, DiffAttack, DiffHammer and AutoAttack
  rand with a large EOT, each by one draw and the worst and the majority of 10 purifications);
* the size: `reduced` (default, sized for a 2-core CPU) or `full` (the paper-size protocol).
"""

from __future__ import annotations

import dataclasses

from experiments.attack import AttackRun
from experiments.config import config_words, field

ROWS = (
    "undefended", "adv-trained", "diffpure", "diffpure-exact", "diffpure-final",
    "diffpure-diffattack", "diffpure-diffhammer", "diffpure-large-eot",
)  # fmt: skip
# The main job's rows: within 10 minutes on a 2-core CPU (diffpure-exact adds about 4 minutes).
MAIN_ROWS = ("undefended", "adv-trained", "diffpure", "diffpure-final")
STRICT = ("one_draw", "worst_of_10", "majority_of_10")
# How the DiffPure rows other than `diffpure` (the study's own settings) differ from it.
DIFFPURE_ROWS = {
    "diffpure-exact": dict(grad="exact"),
    "diffpure-final": dict(grad="exact", attack="pgd-eot-final", protocols=STRICT),
    "diffpure-diffattack": dict(grad="exact", attack="diffattack", protocols=STRICT),
    "diffpure-diffhammer": dict(grad="exact", attack="diffhammer", protocols=STRICT, eot=None),
    # AutoAttack rand with the study's large EOT (`large_eot`), DiffBreak's kind of run.
    "diffpure-large-eot": dict(grad="exact", protocols=STRICT),
}


@dataclasses.dataclass(frozen=True)
class FashionMnistStudy(AttackRun):
    """Shared settings (the DiffPure row's) and the rows derived from them (`study_rows`)."""

    rows: tuple[str, ...] = field(MAIN_ROWS, choices=ROWS, identity=False)
    adv_classifier: str = field("checkpoints/fmnist-wrn-16-1-pgd", help="the PGD-trained row's")
    undefended_version: str = field(
        "standard", choices=("standard", "rand"), help="AutoAttack of the undefended rows"
    )
    sweep_t_stars: tuple[float, ...] | None = field(
        None, help="one DiffPure row per t*, each with sweep_steps reverse steps"
    )
    sweep_steps: int = field(10, help="reverse steps of each sweep row")
    large_eot: tuple[int, int, int] = field(
        (128, 10, 32), help="diffpure-large-eot's EOT draws, iterations and EOT chunk"
    )


def _study(name: str, full: bool) -> dict:
    """The settings of one study at one size (what differs from `main`)."""
    n = dict(n_examples=512, batch_size=64) if full else dict(n_examples=32, batch_size=16)
    diff = (
        dict(dt=1e-3, eot=20, n_iter=100, n_queries=5000)
        if full
        else dict(dt=1e-2, eot=4, n_iter=20, n_queries=1000)
    )
    pgd = dict(dt=1e-3, eot=20, n_iter=200) if full else dict(dt=1e-2, eot=4, n_iter=20)
    if name == "main":
        return (
            dict(n_examples=512, batch_size=64, dt=1e-3, eot=20, n_iter=100, n_queries=5000)
            if full
            else {}
        )
    if name == "undefended":
        size = n if full else dict(n_examples=64, batch_size=64)
        return dict(rows=ROWS[:2], **size, n_iter=100, n_queries=5000)
    one = dict(rows=("diffpure",), **n)
    if name == "adjoint":
        return dict(one, **diff, version="rand", grad="adjoint", workdir="workdir/fmnist")
    if name == "exact":
        return dict(one, **diff, grad="exact", protocols=STRICT, workdir="workdir/fmnist_exact")
    if name in ("pgd", "pgd-final"):
        attack = "pgd-eot" if name == "pgd" else "pgd-eot-final"
        return dict(one, **pgd, attack=attack, grad="exact", protocols=STRICT)
    if name == "bpda":
        # full: DiffPure's own BPDA+EOT settings (attacks.pgd.bpda_eot)
        size = dict(eot=None, n_iter=None) if full else dict(eot=4, n_iter=20)
        return dict(one, dt=pgd["dt"], **size, attack="bpda-eot")
    if name == "unseen":
        # The paper's unseen-threat study: one defense (DiffPure + the standard classifier,
        # exact gradients) and the PGD(Linf)-trained classifier, each under the norm word's
        # threat (Linf, L2 or StAdv). AutoAttack rand on DiffPure (its own EOT), standard on
        # the adversarially trained net; StAdv for the StAdv threat.
        return dict(
            rows=("adv-trained", "diffpure"), **n, **diff, grad="exact", protocols=STRICT,
            workdir="workdir/fmnist_unseen",
        )  # fmt: skip
    if name == "sweep":
        return dict(
            one, eot=20 if full else 2, n_iter=200 if full else 10, attack="pgd-eot-final",
            grad="exact", protocols=STRICT, sweep_t_stars=(0.05, 0.1, 0.2, 0.3),
            sweep_steps=100 if full else 10, workdir="workdir/fmnist_sweep",
        )  # fmt: skip
    if name == "strongest":
        # The literature's strongest attacks on one defense, exact gradients, the same images.
        size = (
            dict(n_examples=512, batch_size=64, dt=1e-3, eot=20, n_iter=100)
            if full
            else dict(n_examples=64, batch_size=16, dt=1e-2, eot=2, n_iter=10, large_eot=(16, 5, 8))
        )
        return dict(
            rows=ROWS[3:], **size, grad="exact", protocols=STRICT,
            workdir="workdir/fmnist_strongest" + ("_full" if full else ""),
        )  # fmt: skip
    raise AssertionError(name)


STUDIES = (
    "main", "undefended", "adjoint", "exact", "pgd", "pgd-final", "bpda", "sweep", "unseen",
    "strongest",
)  # fmt: skip
# norm -> (eps, t*); StAdv: DiffPure's flow bound 0.05 (0.7 px on a 28-pixel side), its attack.
NORMS = {"Linf": (0.1, 0.1), "L2": (1.5, 0.1), "L1": (10.0, 0.1), "StAdv": (0.05, 0.1)}


def get_config(arg: str = "") -> FashionMnistStudy:
    """a study (main, undefended, adjoint, exact, pgd, pgd-final, bpda, sweep, unseen,
    strongest), reduced or full, and a norm (Linf, L2, L1, StAdv); default main,reduced,Linf."""
    words = config_words(arg, (*STUDIES, "reduced", "full", *NORMS))
    study = ([w for w in words if w in STUDIES] or ["main"])[-1]
    norm = ([w for w in words if w in NORMS] or ["Linf"])[-1]
    eps, t_star = NORMS[norm]
    base = FashionMnistStudy(
        dataset="fashion_mnist",
        classifier="checkpoints/fmnist-wrn-16-1",
        score="checkpoints/fmnist-ncsnpp-small",
        norm=norm,
        attack="stadv" if norm == "StAdv" else "autoattack",
        eps=eps,
        t_star=t_star,
        dt=1e-2,
        grad="adjoint",
        version="rand",
        eot=2,
        n_iter=10,
        n_queries=500,
        n_examples=32,
        batch_size=32,
        workdir="workdir/fmnist",
    )
    return dataclasses.replace(base, **_study(study, "full" in words))


def study_rows(study: FashionMnistStudy) -> list[tuple[str, AttackRun]]:
    """(row name, its AttackRun) for every row of the study, in table order."""
    run = AttackRun(**{f.name: getattr(study, f.name) for f in dataclasses.fields(AttackRun)})
    out = []
    for row in study.rows:
        if row == "diffpure" and study.sweep_t_stars:
            for t in study.sweep_t_stars:
                out.append((row, dataclasses.replace(run, t_star=t, dt=t / study.sweep_steps)))
        elif row == "diffpure":
            out.append((row, run))
        elif row == "diffpure-large-eot":
            eot, n_iter, chunk = study.large_eot
            changes = dict(DIFFPURE_ROWS[row], eot=eot, n_iter=n_iter, eot_chunk=chunk)
            out.append((row, dataclasses.replace(run, **changes)))
        elif row in DIFFPURE_ROWS:
            out.append((row, dataclasses.replace(run, **DIFFPURE_ROWS[row])))
        else:
            classifier = study.adv_classifier if row == "adv-trained" else study.classifier
            out.append((row, run.undefended(classifier, study.undefended_version)))
    return out
