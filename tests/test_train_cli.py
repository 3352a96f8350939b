"""The training entry points through their configs: every flag of the old hand-kept lists still
parses to the same setting, the variants, and one tiny real fine-tuning run on Fashion-MNIST."""

import dataclasses
import os

from helpers import refusal

from diffpure_jax.train import ClassifierTraining, LoopConfig, ScoreTraining
from experiments import train_classifier, train_score
from experiments.config import identity
from experiments.configs import train_classifier as classifier_configs
from experiments.configs import train_score as score_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints")


def test_classifier_defaults_are_the_shipped_standard_run():
    run = train_classifier.get_run([])
    assert run == classifier_configs.get_config("") == classifier_configs.get_config("standard")
    assert (run.out, run.workdir, run.data_dir, run.init_from, run.n_train) == (
        "checkpoints/fmnist-wrn-16-1", None, None, None, None,
    )  # fmt: skip
    assert (run.depth, run.widen_factor, run.epochs, run.batch_size) == (16, 1, 15, 128)
    assert (run.seed, run.save_every, run.progress) == (0, 200, True)
    assert run.training == ClassifierTraining()
    assert run.train_workdir() == os.path.join("workdir", "train", "fmnist-wrn-16-1")
    assert run.model_kwargs() == {"depth": 16, "widen_factor": 1, "num_classes": 10}
    assert run.loop(60000) == LoopConfig(7031, 128, 0, 200)  # checkpoints/README.md's steps


def test_every_old_classifier_flag_sets_its_field():
    run = train_classifier.get_run(
        ["--out", "o", "--workdir", "w", "--data-dir", "d", "--depth", "10", "--widen-factor",
         "2", "--epochs", "0.5", "--batch-size", "32", "--seed", "3", "--save-every", "7",
         "--lr", "0.01", "--weight-decay", "0", "--adversarial-eps", "0.2", "--noise-std",
         "0.16", "--diffuse-t-star", "0.1", "--init-from", "ck", "--norm", "L2",
         "--pgd-steps", "3", "--n-train", "100", "--no-progress"]
    )  # fmt: skip
    assert (run.out, run.workdir, run.data_dir, run.init_from) == ("o", "w", "d", "ck")
    assert (run.depth, run.widen_factor, run.epochs, run.batch_size) == (10, 2, 0.5, 32)
    assert (run.seed, run.save_every, run.n_train, run.progress) == (3, 7, 100, False)
    assert run.training == dataclasses.replace(
        ClassifierTraining(), lr=0.01, weight_decay=0.0, adversarial_eps=0.2, noise_std=0.16,
        diffuse_t_star=0.1, norm="L2", pgd_steps=3,
    )  # fmt: skip
    assert run.train_workdir() == "w"
    # Fields of ClassifierTraining no hand-kept list named are flags too.
    more = train_classifier.get_run(["--momentum", "0.8", "--no-flip", "--pgd-step-size", "0.05"])
    assert (more.training.momentum, more.training.flip, more.training.pgd_step_size) == (
        0.8, False, 0.05,
    )  # fmt: skip


def test_pgd_config_is_the_shipped_pgd_run():
    run = train_classifier.get_run(["--config", "pgd"])
    # checkpoints/README.md: --adversarial-eps 0.1 --pgd-steps 5 --epochs 4 --out ...-pgd
    same = train_classifier.get_run(
        ["--adversarial-eps", "0.1", "--pgd-steps", "5", "--epochs", "4",
         "--out", "checkpoints/fmnist-wrn-16-1-pgd"]
    )  # fmt: skip
    assert run == same
    assert (run.training.adversarial_eps, run.training.pgd_steps, run.epochs) == (0.1, 5, 4)
    assert run.out == "checkpoints/fmnist-wrn-16-1-pgd"
    assert run.train_workdir() == os.path.join("workdir", "train", "fmnist-wrn-16-1-pgd")
    assert run.loop(60000).n_steps == 1875
    assert train_classifier.get_run(["--config", "pgd", "--epochs", "1"]).epochs == 1


def test_classifier_identity_and_refusals(capsys):
    run = train_classifier.get_run([])
    layout = train_classifier.get_run(
        ["--out", "x", "--workdir", "y", "--data-dir", "z", "--save-every", "5", "--no-progress"]
    )
    assert identity(layout) == identity(run)  # nothing that changes the weights
    assert identity(run)["training"] == dataclasses.asdict(ClassifierTraining())
    assert identity(train_classifier.get_run(["--lr", "0.2"])) != identity(run)
    assert "invalid choice: 'L1'" in refusal(capsys, train_classifier.get_run, ["--norm", "L1"])
    assert "unknown config word" in refusal(capsys, train_classifier.get_run, ["--config", "big"])


def test_score_defaults_and_every_old_flag():
    run = train_score.get_run([])
    assert run == score_configs.get_config("small") == score_configs.get_config("")
    assert (run.out, run.steps, run.batch_size, run.seed, run.save_every) == (
        "checkpoints/fmnist-ncsnpp-small", 6000, 64, 0, 250,
    )  # fmt: skip
    assert run.training == ScoreTraining()
    assert run.model_kwargs() == score_configs.FMNIST_NCSNPP
    assert run.loop() == LoopConfig(6000, 64, 0, 250)
    assert run.train_workdir() == os.path.join("workdir", "train", "fmnist-ncsnpp-small")
    changed = train_score.get_run(
        ["--out", "o", "--workdir", "w", "--data-dir", "d", "--steps", "20", "--batch-size", "8",
         "--seed", "2", "--save-every", "5", "--nf", "32", "--num-res-blocks", "1",
         "--lr", "1e-3", "--warmup-steps", "10", "--ema-decay", "0.99",
         "--small-t-fraction", "0.25", "--small-t-max", "0.2", "--n-train", "50",
         "--no-progress", "--grad-clip", "2"]
    )  # fmt: skip
    assert (changed.out, changed.train_workdir(), changed.data_dir) == ("o", "w", "d")
    assert changed.loop() == LoopConfig(20, 8, 2, 5)
    assert (changed.n_train, changed.progress) == (50, False)
    assert changed.model_kwargs() == {
        **score_configs.FMNIST_NCSNPP, "nf": 32, "num_res_blocks": 1
    }  # fmt: skip
    assert changed.training == ScoreTraining(
        lr=1e-3, warmup_steps=10, ema_decay=0.99, small_t_fraction=0.25, small_t_max=0.2,
        grad_clip=2.0,
    )  # fmt: skip
    assert identity(train_score.get_run(["--out", "x", "--save-every", "1"])) == identity(run)


def test_score_entry_point_hands_the_config_to_the_trainer(monkeypatch, tmp_path):
    calls = []

    def fake_train_score(x, out, workdir, kwargs, loop, cfg, **rest):
        calls.append((x.shape, out, workdir, kwargs, loop, cfg, rest))
        return {"training": {"n_steps": loop.n_steps}}

    monkeypatch.setattr(train_score, "train_score", fake_train_score)
    argv = ["--n-train", "64", "--steps", "3", "--ema-decay", "0.9", "--nf", "8",
            "--out", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    assert train_score.main(argv) == {"training": {"n_steps": 3}}
    ((shape, out, workdir, kwargs, loop, cfg, rest),) = calls
    assert shape == (64, 28, 28, 1) and out == str(tmp_path / "s")
    assert workdir == os.path.join("workdir", "train", "s")
    assert kwargs == {**score_configs.FMNIST_NCSNPP, "nf": 8}
    assert loop == LoopConfig(3, 64, 0, 250)
    assert cfg == ScoreTraining(ema_decay=0.9)
    assert rest["progress"] is False
    assert rest["extra_config"] == {
        "command": "python -m experiments.train_score " + " ".join(argv)
    }


def test_fine_tuning_from_the_shipped_classifier(tmp_path, capsys):
    base = os.path.join(CKPT, "fmnist-wrn-16-1")
    args = ["--init-from", base, "--epochs", "0.003", "--lr", "0.001"]
    out = str(tmp_path / "ft")
    argv = [*args, "--out", out, "--workdir", str(tmp_path / "w"), "--no-progress"]
    config = train_classifier.main(argv)
    training = config["training"]
    assert training["provenance"] == {"init_from": base}
    assert training["training"] == dataclasses.asdict(ClassifierTraining(lr=0.001))
    assert training["loop"]["n_steps"] == 1  # round(0.003 * 60000 / 128)
    assert training["command"] == "python -m experiments.train_classifier " + " ".join(argv)
    assert config["test_accuracy"] > 90.0  # one small step from the shipped classifier
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert "already holds a checkpoint" in refusal(capsys, train_classifier.main, argv)
    other = [*args, "--widen-factor", "2", "--out", str(tmp_path / "x"), "--no-progress"]
    assert "widen-factor" in refusal(capsys, train_classifier.main, other)
