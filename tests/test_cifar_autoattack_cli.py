"""`python -m experiments.cifar_autoattack` end to end on tfds mock CIFAR-10 (no network)."""

import json

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds
from helpers import refusal

from diffpure_jax.checkpoint import save_variables
from diffpure_jax.models import build_model
from diffpure_jax.models.ncsnpp import tiny_ncsnpp_kwargs
from experiments import cifar_autoattack


@pytest.fixture(scope="module")
def random_wrn(tmp_path_factory):
    """A WideResNet-10-1 with random weights, saved as a checkpoint."""
    kwargs = {"depth": 10, "widen_factor": 1, "num_classes": 10}
    variables = build_model("wideresnet", kwargs).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    path = str(tmp_path_factory.mktemp("ckpt") / "wrn")
    config = {"kind": "classifier", "architecture": "wideresnet", "kwargs": kwargs}
    save_variables(path, variables, {**config, "input_shape": [32, 32, 3]})
    return path


@pytest.fixture(scope="module")
def tiny_score(tmp_path_factory):
    """A small NCSN++ (nf 8, one resolution change) with random weights, saved as a checkpoint:
    the CLI's wiring does not need the reference model, whose exact-gradient attack compiles
    for minutes on a 2-core CPU (the converted model is tested in test_convert_cli)."""
    kwargs = tiny_ncsnpp_kwargs(32, init_scale=0.0)
    model = build_model("ncsnpp", kwargs)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    path = str(tmp_path_factory.mktemp("ckpt") / "score")
    config = {
        "kind": "score", "architecture": "ncsnpp", "kwargs": kwargs,
        "parameterization": "eps_continuous",
        "sde": {"beta_min": 0.1, "beta_max": 20.0, "n_discrete": 1000},
    }  # fmt: skip
    save_variables(path, variables, {**config, "input_shape": [32, 32, 3]})
    return path


@pytest.mark.slow
def test_undefended_standard_autoattack_on_mock_cifar10(random_wrn, tmp_path, capsys):
    argv = [
        "--classifier", random_wrn, "--defense", "none", "--version", "standard",
        "--n-iter", "3", "--n-queries", "20", "--n-examples", "6", "--batch-size", "4",
        "--workdir", str(tmp_path / "run"), "--no-progress", "--eps", "8/255",
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=20):
        summary = cifar_autoattack.main(argv)
    assert summary["n_examples"] == 6
    assert list(summary["accuracy_after_each_attack_one_draw"]) == [
        "apgd-ce", "apgd-t", "fab-t", "square",
    ]  # fmt: skip
    assert summary["max_linf"] <= 8 / 255 + 1e-6
    (workdir,) = (tmp_path / "run").iterdir()  # --workdir/<row>-<hash of the settings>
    assert workdir.name.startswith("undefended-")
    records = [json.loads(line) for line in (workdir / "records.jsonl").open()]
    assert sorted(r["index"] for r in records) == sorted(set(r["index"] for r in records))
    assert "| one_draw | 6 |" in capsys.readouterr().out


@pytest.mark.slow
def test_defended_rand_autoattack_on_mock_cifar10(random_wrn, tiny_score, tmp_path):
    argv = [
        "--classifier", random_wrn, "--score", tiny_score, "--t-star", "0.002",
        "--grad", "exact", "--version", "rand", "--eot", "2", "--n-iter", "2", "--n-examples", "2",
        "--batch-size", "2", "--workdir", str(tmp_path / "run"), "--no-progress",
        "--protocols", "one_draw", "majority_of_3",
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=10):
        summary = cifar_autoattack.main(argv)
    assert summary["n_examples"] == 2
    assert set(summary["robust_accuracy"]) == {"one_draw", "majority_of_3"}


def test_missing_checkpoint_and_data_say_what_to_do(tmp_path, capsys, random_wrn, tiny_score):
    nothing = str(tmp_path / "nothing")
    with tfds.testing.mock_data(num_examples=4):
        err = refusal(capsys, cifar_autoattack.main, ["--classifier", nothing, "--n-examples", "2"])
    assert "no classifier checkpoint at" in err and nothing in err
    assert "python -m diffpure_jax.convert robustbench-wrn" in err
    ok = ["--classifier", random_wrn, "--score", tiny_score, "--n-examples", "2"]
    err = refusal(capsys, cifar_autoattack.main, ["--data-dir", str(tmp_path), *ok], 5)
    assert "CIFAR-10 is not prepared" in err
    # Every missing input at once, before any work: both checkpoints and the data.
    argv = ["--data-dir", str(tmp_path), "--classifier", nothing, "--score", nothing + "2"]
    err = refusal(capsys, cifar_autoattack.main, [*argv, "--workdir", str(tmp_path / "w")], 6)
    assert nothing in err and nothing + "2" in err and "CIFAR-10 is not prepared" in err
    assert not (tmp_path / "w").exists()  # nothing was created
