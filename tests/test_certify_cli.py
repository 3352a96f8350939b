"""`python -m experiments.certify` and its curve report: the config, the refusals, and a tiny
resumable run on the shipped Fashion-MNIST checkpoints and the real test set."""

import json
import os

import pytest
from helpers import Killed, kill_at, refusal

from diffpure_jax.data import fashion_mnist_test
from diffpure_jax.runner import read_records
from experiments import certify
from experiments.config import identity, run_dir
from experiments.configs import certify as config_module
from experiments.reports import certify_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints")
MODELS = [
    "--classifier", os.path.join(CKPT, "fmnist-wrn-16-1"),
    "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"),
]  # fmt: skip
TINY = ["--config", "fmnist", "--n0", "10", "--n", "20", "--n-examples", "2", "--batch", "10",
        "--examples-per-batch", "1", "--no-progress", *MODELS]  # fmt: skip


def test_configs_are_the_protocols():
    fmnist = config_module.get_config("fmnist")
    assert fmnist == config_module.get_config("fmnist,reduced,sigma0.25")
    assert (fmnist.dataset, fmnist.sigma, fmnist.alpha) == ("fashion_mnist", 0.25, 0.001)
    assert (fmnist.n0, fmnist.n, fmnist.n_examples) == (100, 1000, 100)
    assert fmnist.classifier == "checkpoints/fmnist-wrn-16-1"
    assert fmnist.score == "checkpoints/fmnist-ncsnpp-small"
    assert fmnist.n_reverse == 0 and fmnist.clip
    full = config_module.get_config("fmnist,full,sigma0.5")
    assert (full.n0, full.n, full.n_examples, full.sigma) == (100, 100_000, 500, 0.5)
    # The default: Carlini et al.'s CIFAR-10 protocol (the whole test set, n = 100,000).
    cifar = config_module.get_config("")
    assert (cifar.dataset, cifar.n0, cifar.n, cifar.n_examples) == ("cifar10", 100, 100_000, 10_000)
    imagenet = config_module.get_config("imagenet,sigma1.0")
    assert (imagenet.n, imagenet.n_examples, imagenet.input_size) == (10_000, 1000, 224)
    # Only the fields that change the records are the run's identity.
    assert {"batch", "examples_per_batch", "workdir", "radii", "progress"}.isdisjoint(
        identity(fmnist)
    )


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        certify.main(["--config", "fmnist", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--classifier", "--score", "--sigma", "--n0", "--n ", "--alpha", "--n-examples",
                 "--data-seed", "--seed", "--n-reverse", "--n-steps", "--clip", "--batch",
                 "--examples-per-batch", "--radii", "--workdir", "--progress"):  # fmt: skip
        assert flag in out, flag
    assert "(default: 1000)" in out and "(default: workdir/fmnist_certify)" in out


def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "no-such-classifier")
    workdir = tmp_path / "w"
    argv = [*TINY, "--classifier", missing, "--workdir", str(workdir)]
    err = refusal(capsys, certify.main, argv, max_lines=1)
    assert missing in err and "python -m experiments.train_classifier" in err
    assert not workdir.exists()
    err = refusal(capsys, certify.main, [*TINY, "--sigma", "0"], max_lines=2)
    assert "--sigma must be positive" in err
    err = refusal(capsys, certify.main, [*TINY, "--config", "fmnist,huge"], max_lines=2)
    assert "unknown config word" in err
    err = refusal(capsys, certify.main, [*TINY, "--input-size", "24"], max_lines=1)
    assert "takes 28x28x1 images but the denoiser" in err and "returns 24x24x1" in err
    # A workdir holding a run of other settings is kept, not overwritten.
    run = certify.get_run([*TINY, "--workdir", str(workdir)])
    held = run_dir(str(workdir), "certify", run)
    os.makedirs(held)
    with open(os.path.join(held, "run_config.json"), "w") as f:
        json.dump({**identity(run), "n": 30}, f)
    err = refusal(capsys, certify.main, [*TINY, "--workdir", str(workdir)], max_lines=1)
    assert "holds a run with other settings (n)" in err
    assert os.listdir(held) == ["run_config.json"]


@pytest.fixture(scope="module")
def fashion_mnist():
    return fashion_mnist_test(2, seed=0)  # fails with the apt-get hint if the data is missing


@pytest.mark.slow
def test_tiny_run_resumes_and_feeds_the_curve_report(tmp_path, capsys, fashion_mnist):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with pytest.raises(Killed):
        certify.main([*TINY, "--workdir", a], after_batch=kill_at(0))
    (workdir_a,) = [os.path.join(a, d) for d in os.listdir(a)]
    assert os.path.basename(workdir_a).startswith("certify-")
    assert len(read_records(workdir_a)) == 1
    resumed = certify.main([*TINY, "--workdir", a])
    whole = certify.main([*TINY, "--workdir", b])
    (workdir_b,) = [os.path.join(b, d) for d in os.listdir(b)]
    assert read_records(workdir_a) == read_records(workdir_b)
    strip = ("noise_samples_per_second",)
    assert {k: v for k, v in resumed.items() if k not in strip} == {
        k: v for k, v in whole.items() if k not in strip
    }
    _, y, index = fashion_mnist
    records = sorted(read_records(workdir_b), key=lambda r: r["index"])
    assert [r["index"] for r in records] == sorted(int(i) for i in index)
    for r in records:
        assert (r["n0"], r["n"], r["sigma"]) == (10, 20, 0.25)
        assert r["prediction"] in (-1, r["guess"]) and r["radius"] >= 0
    assert whole["n_examples"] == 2 and whole["noise_samples_per_second"] > 0
    out = capsys.readouterr().out
    assert "| L2 radius | certified accuracy (%) |" in out and "noise samples per second" in out

    png, js = tmp_path / "curve.png", tmp_path / "curve.json"
    result = certify_curve.main(
        ["--workdirs", workdir_a, workdir_b, "--out", str(png), "--json", str(js)]
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(js.read_text()) == json.loads(json.dumps(result))
    (run_a, run_b) = result["runs"]
    assert run_a["certified_accuracy"] == run_b["certified_accuracy"]
    assert run_a["certified_accuracy"]["0"] == pytest.approx(100 * whole["accuracy"])
    assert (run_a["n0"], run_a["n"], run_a["n_examples"]) == (10, 20, 2)
    assert "| 0.25 | 2 | 10 | 20 |" in capsys.readouterr().out
