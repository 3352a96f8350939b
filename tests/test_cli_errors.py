"""Bad inputs through the real entry points: each is refused before any work, in one or a few
lines (`error: ...`, exit code 2, no traceback), and nothing already computed is lost."""

import os

import pytest
from helpers import refusal

from experiments import cifar_autoattack, fashion_mnist_autoattack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints")
MODELS = [
    "--classifier", os.path.join(CKPT, "fmnist-wrn-16-1"),
    "--adv-classifier", os.path.join(CKPT, "fmnist-wrn-16-1-pgd"),
    "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"),
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eps", "2"], "Linf --eps must be in (0, 1]"),
        (["--norm", "L2", "--eps", "0"], "--eps must be positive"),
        (["--n-examples", "20000"], "--n-examples must be in [1, 10000]"),
        (["--dt", "0.03"], "does not divide t_star"),
        (["--t-star", "1.5"], "t_star must be in (0, 1]"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--eot", "0"], "--eot must be at least 1"),
        (["--protocols", "best_of_3"], "unknown protocol"),
        (["--config", "huge"], "unknown config word"),
        (["--grad", "magic"], "invalid choice: 'magic'"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, argv, message):
    workdir = tmp_path / "w"
    err = refusal(capsys, fashion_mnist_autoattack.main, [*argv, "--workdir", str(workdir)], 2)
    assert message in err
    assert not workdir.exists()


def test_missing_checkpoints_are_listed_at_once(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    argv = ["--classifier", a, "--adv-classifier", b, "--workdir", str(tmp_path / "w")]
    err = refusal(capsys, fashion_mnist_autoattack.main, argv, 2)
    assert a in err and b in err and "python -m experiments.train_classifier" in err
    assert not (tmp_path / "w").exists()


def test_missing_data_and_workdir_that_is_a_file(tmp_path, capsys):
    err = refusal(capsys, fashion_mnist_autoattack.main, ["--data-dir", str(tmp_path)], 3)
    assert "apt-get install dataset-fashion-mnist" in err
    afile = tmp_path / "file"
    afile.write_text("x")
    err = refusal(capsys, fashion_mnist_autoattack.main, ["--workdir", str(afile)])
    assert "is a file" in err
    assert afile.read_text() == "x"


def test_cifar_entry_point_refuses_the_same_way(tmp_path, capsys):
    err = refusal(capsys, cifar_autoattack.main, ["--eps", "300/255"], 2)
    assert "Linf --eps must be in (0, 1]" in err
    err = refusal(capsys, cifar_autoattack.main, ["--norm", "L5"], 2)
    assert "unknown config word" in err


def test_a_refused_rerun_loses_nothing(tmp_path, capsys):
    """A finished row, then bad reruns: its records and adversarial files are untouched."""
    argv = [
        "--rows", "undefended", "--n-examples", "2", "--batch-size", "2", "--n-iter", "2",
        "--n-queries", "5", "--no-progress", "--workdir", str(tmp_path), *MODELS,
    ]  # fmt: skip
    fashion_mnist_autoattack.main(argv)
    files = {
        os.path.join(root, name): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(tmp_path)
        for name in names
    }
    assert any(path.endswith("records.jsonl") for path in files)
    refusal(capsys, fashion_mnist_autoattack.main, [*argv, "--eps", "2"], 2)
    refusal(capsys, fashion_mnist_autoattack.main, [*argv, "--classifier", str(tmp_path / "x")], 2)
    after = {
        os.path.join(root, name): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(tmp_path)
        for name in names
    }
    assert after == files


def test_a_corrupt_or_edited_checkpoint_is_named_before_any_work(tmp_path, capsys):
    import json
    import shutil

    bad = tmp_path / "wrn"
    shutil.copytree(os.path.join(CKPT, "fmnist-wrn-16-1"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["kwargs"]["widen_factor"] = 2
    (bad / "config.json").write_text(json.dumps(config))
    argv = ["--classifier", str(bad), "--workdir", str(tmp_path / "w")]
    err = refusal(capsys, fashion_mnist_autoattack.main, argv, 2)
    assert str(bad / "config.json") in err and "does not match the stored variables" in err
    (bad / "config.json").write_text('{"kind": "classifier", ')
    err = refusal(capsys, fashion_mnist_autoattack.main, argv, 2)
    assert str(bad / "config.json") in err and "is not valid JSON" in err
    assert not (tmp_path / "w").exists()
