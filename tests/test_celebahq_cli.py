"""`python -m experiments.celebahq_autoattack` end to end on a generated CelebA-HQ copy in
DiffPure's layout: a tiny DDPM UNet at 256 x 256 behind a tiny attribute net."""

import json

import jax
import jax.numpy as jnp
import pytest
from helpers import make_celebahq, refusal

from diffpure_jax.checkpoint import save_variables
from diffpure_jax.models import build_model
from experiments import celebahq_autoattack


def _save(path, kind, architecture, kwargs, example, extra=None):
    variables = build_model(architecture, kwargs).init(jax.random.key(0), *example)
    config = {"kind": kind, "architecture": architecture, "kwargs": kwargs, **(extra or {})}
    save_variables(str(path), variables, {**config, "input_shape": list(example[0].shape[1:])})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(DDPM score checkpoint, attribute classifier checkpoint, data dir), random weights. The
    UNet has the official six levels (its middle attention then runs at 8 x 8, not at a size
    whose attention matrix would fill the memory)."""
    root = tmp_path_factory.mktemp("celebahq")
    ddpm = {
        "image_size": 256, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1] * 6,
        "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "resamp_with_conv": True,
    }  # fmt: skip
    x = jnp.zeros((1, 256, 256, 3))
    score = _save(
        root / "ddpm", "score", "ddpm_unet", ddpm, (x, jnp.zeros((1,), jnp.int32)),
        {"parameterization": "ddpm_eps", "ddpm": {"beta_start": 0.0001, "beta_end": 0.02,
         "num_timesteps": 1000, "var_type": "fixedsmall"}},
    )  # fmt: skip
    net = {"resolution": 32, "fmap_base": 64, "fmap_max": 16, "input_size": 256}
    classifier = _save(root / "attr", "classifier", "attribute_net", net, (x,))
    return score, classifier, str(make_celebahq(root / "data", n=30, size=32))


def test_missing_data_and_unknown_attribute(setup, tmp_path, capsys):
    score, classifier, data = setup
    argv = ["--score", score, "--classifier", classifier, "--workdir", str(tmp_path)]
    message = refusal(capsys, celebahq_autoattack.main, [*argv, "--data-dir", str(tmp_path)], 8)
    assert "CelebA-HQ is not in" in message and "list_attr_celeba.txt" in message
    message = refusal(
        capsys, celebahq_autoattack.main, [*argv, "--data-dir", data, "--attribute", "Glasses"]
    )
    assert "unknown CelebA attribute 'Glasses'" in message
    message = refusal(
        capsys, celebahq_autoattack.main,
        [*argv, "--data-dir", data, "--grad", "adjoint", "--attack", "pgd-eot", "--n-examples",
         "2"],
    )  # fmt: skip
    assert "is a DDPM chain: grad='adjoint' is the continuous adjoint of the VP-SDE" in message


@pytest.mark.slow
def test_bpda_and_exact_runs(setup, tmp_path):
    score, classifier, data = setup
    argv = [
        "--score", score, "--classifier", classifier, "--data-dir", data, "--t-star", "0.002",
        "--eot", "1", "--n-iter", "2", "--recheck", "2", "--n-examples", "2", "--batch-size", "2",
        "--workdir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    summary = celebahq_autoattack.main(argv)  # the paper's BPDA+EOT
    assert summary["n_examples"] == 2 and summary["max_linf"] <= 0.062745098 + 1e-6
    exact = celebahq_autoattack.main(
        [*argv, "--grad", "exact", "--attack", "pgd-eot-final", "--protocols", "worst_of_2"]
    )
    assert set(exact["robust_accuracy"]) == {"worst_of_2"}
    stored = [json.loads((d / "run_config.json").read_text()) for d in (tmp_path / "run").iterdir()]
    assert sorted(s["grad"] for s in stored) == ["bpda", "exact"]
    assert {s["attribute"] for s in stored} == {"Eyeglasses"}
