"""Experiment configs: the command line generated from the config, the run identity, variants."""

import dataclasses

import pytest
from helpers import refusal

from diffpure_jax.attacks import suites
from experiments import (
    celebahq_autoattack,
    cifar_autoattack,
    fashion_mnist_autoattack,
    imagenet_autoattack,
)
from experiments.attack import AttackRun
from experiments.config import identity, run_dir
from experiments.configs import fashion_mnist_autoattack as fmnist


def test_every_cli_field_is_a_flag_with_the_config_value_as_default():
    run = cifar_autoattack.get_run([])
    assert run == cifar_autoattack.config_module.get_config("")
    changed = cifar_autoattack.get_run(
        ["--eps", "4/255", "--grad", "exact", "--eot", "none", "--n-iter", "7", "--no-unroll",
         "--protocols", "one_draw", "worst_of_5", "--attacks", "apgd-ce", "square"]
    )  # fmt: skip
    assert changed.eps == pytest.approx(4 / 255)
    assert (changed.grad, changed.eot, changed.n_iter) == ("exact", None, 7)
    assert changed.protocols == ("one_draw", "worst_of_5")
    assert changed.attacks == ("apgd-ce", "square")
    # Nothing else moved.
    same = {"eps", "grad", "eot", "n_iter", "protocols", "attacks"}
    for f in dataclasses.fields(AttackRun):
        if f.name not in same:
            assert getattr(changed, f.name) == getattr(run, f.name), f.name


def test_norm_flag_selects_the_norm_variant():
    l2 = cifar_autoattack.get_run(["--norm", "L2"])
    assert (l2.norm, l2.eps, l2.t_star) == ("L2", 0.5, 0.075)
    assert cifar_autoattack.get_run(["--config", "L2"]) == l2
    # An explicit flag still wins over the variant.
    assert cifar_autoattack.get_run(["--norm", "L2", "--eps", "0.25"]).eps == 0.25


def test_identity_and_workdir_name():
    run = cifar_autoattack.get_run([])
    layout = cifar_autoattack.get_run(
        ["--workdir", "elsewhere", "--no-progress", "--unroll", "--coordinator", "h:1"]
    )
    assert identity(layout) == identity(run)  # layout and speed flags do not change results
    assert run_dir("w", "diffpure", run) == run_dir("w", "diffpure", layout)
    other = cifar_autoattack.get_run(["--seed", "1"])
    assert run_dir("w", "diffpure", other) != run_dir("w", "diffpure", run)
    assert {"workdir", "progress", "unroll", "data_dir"}.isdisjoint(identity(run))
    assert identity(run)["protocols"] == ["one_draw"]  # JSON values, as stored


def test_fields_recorded_only_when_changed_keep_old_run_directories():
    run = cifar_autoattack.get_run([])
    # input_size and score_dtype came later: at their defaults they are not in the identity,
    # so the runs made before them keep their directories.
    assert {"input_size", "score_dtype"}.isdisjoint(identity(run))
    bf16 = cifar_autoattack.get_run(["--score-dtype", "bfloat16"])
    assert identity(bf16)["score_dtype"] == "bfloat16"
    assert run_dir("w", "diffpure", bf16) != run_dir("w", "diffpure", run)


def test_restart_flags_reach_the_autoattack_config(monkeypatch, capsys):
    monkeypatch.setattr(suites, "autoattack_suite", lambda threat, config: config)
    run = cifar_autoattack.get_run([])
    assert (run.apgd_restarts, run.fab_restarts) == (None, None)
    assert {"apgd_restarts", "fab_restarts"}.isdisjoint(identity(run))  # old runs keep their dirs
    rand = run.suite()
    assert (rand.attacks, rand.n_restarts, rand.fab_restarts) == (("apgd-ce", "apgd-dlr"), 1, 1)
    custom = cifar_autoattack.get_run(["--version", "custom", "--attacks", "apgd-ce", "fab"])
    assert (custom.suite().n_restarts, custom.suite().fab_restarts) == (5, 5)  # the reference's
    flags = "--version custom --attacks fab --apgd-restarts 2 --fab-restarts 3".split()
    given = cifar_autoattack.get_run(flags)
    assert (given.suite().n_restarts, given.suite().fab_restarts) == (2, 3)
    assert (identity(given)["apgd_restarts"], identity(given)["fab_restarts"]) == (2, 3)
    assert run_dir("w", "diffpure", given) != run_dir("w", "diffpure", custom)
    standard = cifar_autoattack.get_run(["--version", "standard", "--fab-restarts", "2"])
    assert (standard.suite().n_restarts, standard.suite().fab_restarts) == (1, 2)
    assert "must be at least 1" in refusal(
        capsys, cifar_autoattack.get_run, ["--apgd-restarts", "0"]
    )
    assert "apply to autoattack" in refusal(
        capsys, cifar_autoattack.get_run, ["--attack", "pgd-eot", "--fab-restarts", "2"]
    )


def test_imagenet_config_is_the_papers():
    run = imagenet_autoattack.get_run([])
    assert (run.dataset, run.norm, run.eps, run.t_star, run.dt) == (
        "imagenet", "Linf", 0.0157, 0.15, 1e-3,
    )  # fmt: skip
    assert (run.grad, run.attack, run.version, run.n_examples) == (
        "adjoint", "autoattack", "rand", 512,
    )  # fmt: skip
    assert (run.classifier, run.input_size) == ("checkpoints/imagenet-resnet50", 224)
    assert run.purify_config().input_size == 224 and run.purify_config().n_steps == 150
    deit = imagenet_autoattack.get_run(["--config", "deit-s", "--grad", "exact"])
    assert (deit.classifier, deit.grad) == ("checkpoints/imagenet-deit-s", "exact")
    assert imagenet_autoattack.get_run(["--config", "wrn-50-2"]).classifier.endswith("wrn-50-2")
    assert identity(deit)["input_size"] == 224


def test_celebahq_config_is_the_papers():
    run = celebahq_autoattack.get_run([])
    assert (run.dataset, run.attribute, run.classifier) == (
        "celebahq", "Eyeglasses", "checkpoints/celebahq-eyeglasses",
    )  # fmt: skip
    assert (run.t_star, run.grad, run.attack, run.eps) == (0.5, "bpda", "bpda-eot", 0.062745098)
    assert (run.eot, run.recheck, run.n_examples) == (15, 20, 512)
    smiling = celebahq_autoattack.get_run(["--attribute", "Smiling", "--grad", "exact"])
    assert (smiling.classifier, smiling.grad) == ("checkpoints/celebahq-smiling", "bpda")
    exact = celebahq_autoattack.get_run(["--grad", "exact", "--attack", "pgd-eot-final"])
    assert (exact.grad, exact.attack, exact.recheck) == ("exact", "pgd-eot-final", 20)
    assert identity(exact)["attribute"] == "Eyeglasses"


def test_stadv_is_its_own_threat_and_attack(capsys):
    run = cifar_autoattack.get_run(["--norm", "StAdv"])
    assert (run.attack, run.eps, run.t_star) == ("stadv", 0.05, 0.125)
    assert "--attack stadv --norm StAdv" in refusal(
        capsys, cifar_autoattack.get_run, ["--attack", "stadv"]
    )
    assert "--recheck applies to" in refusal(capsys, cifar_autoattack.get_run, ["--recheck", "5"])


def test_bad_values_are_refused_before_any_work(capsys):
    for argv, message in [
        (["--dt", "0.03"], "does not divide t_star"),
        (["--version", "custom"], "needs --attacks"),
        (["--protocols", "best_of_3"], "unknown protocol"),
        (["--eps", "x"], "expected a number or a fraction"),
    ]:
        assert message in refusal(capsys, cifar_autoattack.get_run, argv)
    assert "unknown config word" in refusal(
        capsys, cifar_autoattack.get_run, ["--config", "Linf,big"]
    )


def test_bpda_attack_takes_bpda_gradients():
    assert cifar_autoattack.get_run(["--attack", "bpda-eot"]).grad == "bpda"


def test_fashion_mnist_main_rows():
    study = fashion_mnist_autoattack.get_study([])
    assert study.rows == fmnist.MAIN_ROWS
    study = fashion_mnist_autoattack.get_study(["--rows", *fmnist.ROWS[:5]])
    rows = fmnist.study_rows(study)  # (ROWS[5:] are the strongest-attacks study's own rows)
    assert [r for r, _ in rows] == [
        "undefended", "adv-trained", "diffpure", "diffpure-exact", "diffpure-final",
    ]  # fmt: skip
    (_, und), (_, adv), (_, diff), (_, exact), (_, final) = rows
    # The paper's gradient and the honest one, side by side; then the final iterate, judged
    # over 10 purifications.
    assert dataclasses.replace(diff, grad="exact") == exact
    assert (
        dataclasses.replace(diff, grad="exact", attack="pgd-eot-final", protocols=fmnist.STRICT)
        == final
    )
    assert type(diff) is AttackRun  # rows are plain runs: the study's own fields are not stored
    # The reduced protocol the README documents.
    assert (diff.n_examples, diff.dt, diff.eot, diff.n_iter, diff.n_queries) == (
        32,
        1e-2,
        2,
        10,
        500,
    )
    assert (diff.grad, diff.version, diff.t_star, diff.eps) == ("adjoint", "rand", 0.1, 0.1)
    assert adv.classifier == study.adv_classifier and und.classifier == study.classifier
    for u in (und, adv):
        assert (u.defense, u.version, u.eot, u.grad, u.t_star, u.score) == (
            "none", "standard", None, None, None, None,
        )  # fmt: skip
        assert u.protocols == ("one_draw",) and u.n_iter == diff.n_iter
    assert len({run_dir("w", r, run) for r, run in rows}) == 5


def test_fashion_mnist_variants():
    full = fmnist.study_rows(fashion_mnist_autoattack.get_study(["--config", "full"]))[-1][1]
    assert (full.n_examples, full.dt, full.eot, full.n_iter, full.n_queries) == (
        512, 1e-3, 20, 100, 5000,
    )  # fmt: skip
    sweep = fmnist.study_rows(fmnist.get_config("sweep"))
    assert [(r.t_star, r.dt) for _, r in sweep] == [(t, t / 10) for t in (0.05, 0.1, 0.2, 0.3)]
    assert all(r.attack == "pgd-eot-final" and r.grad == "exact" for _, r in sweep)
    bpda_full = fmnist.study_rows(fmnist.get_config("bpda,full"))[0][1]
    assert (bpda_full.grad, bpda_full.eot, bpda_full.n_iter) == ("bpda", None, None)
    l2 = fashion_mnist_autoattack.get_study(["--norm", "L2"])
    assert (l2.norm, l2.eps) == ("L2", 1.5)


def test_strongest_attacks_study():
    """Five attacks on one defense, exact gradients, the same 64 images and three protocols."""
    for full in (False, True):
        rows = dict(fmnist.study_rows(fmnist.get_config("strongest,full" if full else "strongest")))
        assert list(rows) == [
            "diffpure-exact", "diffpure-final", "diffpure-diffattack", "diffpure-diffhammer",
            "diffpure-large-eot",
        ]  # fmt: skip
        assert [r.attack for r in rows.values()] == [
            "autoattack", "pgd-eot-final", "diffattack", "diffhammer", "autoattack",
        ]  # fmt: skip
        for run in rows.values():
            assert run.grad == "exact" and run.defense == "diffpure" and run.norm == "Linf"
            assert run.protocols == ("one_draw", "worst_of_10", "majority_of_10")
            assert (run.n_examples, run.eps) == ((512, 0.1) if full else (64, 0.1))
        large = rows["diffpure-large-eot"]
        assert (large.eot, large.n_iter, large.eot_chunk) == ((128, 10, 32) if full else (16, 5, 8))
        assert rows["diffpure-diffhammer"].eot is None
        assert len({run_dir("w", r, run) for r, run in rows.items()}) == 5


# The command lines of the results script before its studies became configs (reduced | full).
_N = ("--n-examples 32 --batch-size 16", "--n-examples 512 --batch-size 64")
_DIFF = (
    "--dt 1e-2 --eot 4 --n-iter 20 --n-queries 1000",
    "--dt 1e-3 --eot 20 --n-iter 100 --n-queries 5000",
)
_PGD = ("--dt 1e-2 --eot 4 --n-iter 20", "--dt 1e-3 --eot 20 --n-iter 200")
_STRICT = "--protocols one_draw worst_of_10 majority_of_10"
OLD_COMMANDS = {
    "undefended": lambda f: (
        "--rows undefended adv-trained "
        + ("--n-examples 64 --batch-size 64", _N[1])[f]
        + " --n-iter 100 --n-queries 5000"
    ),
    "adjoint": lambda f: f"--rows diffpure {_N[f]} {_DIFF[f]} --version rand --grad adjoint",
    "exact": lambda f: (
        f"--rows diffpure {_N[f]} {_DIFF[f]} --version rand --grad exact "
        f"{_STRICT} --workdir workdir/fmnist_exact"
    ),
    "pgd": lambda f: f"--rows diffpure {_N[f]} {_PGD[f]} --attack pgd-eot --grad exact {_STRICT}",
    "pgd-final": lambda f: (
        f"--rows diffpure {_N[f]} {_PGD[f]} --attack pgd-eot-final --grad exact {_STRICT}"
    ),
    # full: DiffPure's own BPDA+EOT (the old script's full line kept the reduced EOT 2, 10 iter.)
    "bpda": lambda f: (
        f"--rows diffpure {_N[f]} "
        + ("--dt 1e-2 --eot 4 --n-iter 20", "--dt 1e-3 --eot none --n-iter none")[f]
        + " --attack bpda-eot"
    ),
}


@pytest.mark.parametrize("full", [0, 1])
@pytest.mark.parametrize("study", sorted(OLD_COMMANDS))
def test_results_studies_are_the_old_script_commands(study, full):
    words = f"{study},{'full' if full else 'reduced'}"
    new = fmnist.study_rows(fashion_mnist_autoattack.get_study(["--config", words]))
    old = fmnist.study_rows(fashion_mnist_autoattack.get_study(OLD_COMMANDS[study](full).split()))
    assert [(r, identity(a)) for r, a in new] == [(r, identity(a)) for r, a in old]
    assert fashion_mnist_autoattack.get_study(["--config", words]).workdir == (
        fashion_mnist_autoattack.get_study(OLD_COMMANDS[study](full).split()).workdir
    )


def test_sweep_study_is_the_old_script_loop():
    for full, (n, eot_iter, steps) in enumerate(
        [(_N[0], "--eot 2 --n-iter 10", 10), (_N[1], "--eot 20 --n-iter 200", 100)]
    ):
        new = fmnist.study_rows(
            fashion_mnist_autoattack.get_study(["--config", "sweep,full" if full else "sweep"])
        )
        for (_, run), t in zip(new, (0.05, 0.1, 0.2, 0.3), strict=True):
            old = f"--rows diffpure {n} {eot_iter} --attack pgd-eot-final --grad exact "
            old += f"--t-star {t} --dt {t / steps} {_STRICT}"
            ((_, old_run),) = fmnist.study_rows(fashion_mnist_autoattack.get_study(old.split()))
            assert identity(run) == identity(old_run)
