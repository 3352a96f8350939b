"""`python -m experiments.imagenet_autoattack` end to end on tfds mock ImageNet (no network):
a tiny ADM at 256 x 256 behind a tiny ResNet at 224 x 224, the sizes the real path uses."""

import json

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds
from helpers import refusal

from diffpure_jax.checkpoint import save_variables
from diffpure_jax.models import build_model
from experiments import imagenet_autoattack


def _save(path, kind, architecture, kwargs, example, extra=None):
    variables = build_model(architecture, kwargs).init(jax.random.key(0), *example)
    config = {"kind": kind, "architecture": architecture, "kwargs": kwargs, **(extra or {})}
    save_variables(str(path), variables, {**config, "input_shape": list(example[0].shape[1:])})
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ADM score checkpoint 256 x 256, ResNet classifier checkpoint 224 x 224), random. The
    ADM has the official six levels: its middle block's attention then runs at 8 x 8 (at 128 x
    128 one exact gradient would need 10 GB)."""
    root = tmp_path_factory.mktemp("imagenet")
    adm = {
        "image_size": 256, "in_channels": 3, "model_channels": 32, "out_channels": 6,
        "num_res_blocks": 1, "attention_resolutions": [], "channel_mult": [1] * 6,
        "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": True,
        "dropout": 0.0,
    }  # fmt: skip
    score = _save(
        root / "adm", "score", "guided_unet", adm,
        (jnp.zeros((1, 256, 256, 3)), jnp.zeros((1,), jnp.int32)),
        {"parameterization": "guided_diffusion",
         "sde": {"beta_min": 0.1, "beta_max": 20.0, "n_discrete": 1000}},
    )  # fmt: skip
    resnet = {"layers": [1, 1, 1, 1], "planes": [4, 8, 8, 8], "stem_channels": 8}
    classifier = _save(
        root / "resnet", "classifier", "resnet", {**resnet, "image_size": 224},
        (jnp.zeros((1, 224, 224, 3)),),
    )  # fmt: skip
    return score, classifier


def test_size_mismatch_is_refused_with_the_fix(models, tmp_path, capsys):
    score, classifier = models
    argv = ["--score", score, "--classifier", classifier, "--workdir", str(tmp_path)]
    with tfds.testing.mock_data(num_examples=4):
        message = refusal(capsys, imagenet_autoattack.main, [*argv, "--input-size", "none"])
    assert "takes 224x224x3 images but the purifier returns 256x256x3" in message
    assert "pass --input-size 224" in message


@pytest.mark.slow
def test_defended_exact_pgd_on_mock_imagenet(models, tmp_path):
    score, classifier = models
    argv = [
        "--score", score, "--classifier", classifier, "--t-star", "0.002", "--grad", "exact",
        "--attack", "pgd-eot-final", "--eot", "1", "--n-iter", "1", "--n-examples", "2",
        "--batch-size", "2", "--workdir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=6):
        summary = imagenet_autoattack.main(argv)
    assert summary["n_examples"] == 2
    assert summary["max_linf"] <= 0.0157 + 1e-6
    (workdir,) = (tmp_path / "run").iterdir()
    stored = json.loads((workdir / "run_config.json").read_text())
    assert (stored["dataset"], stored["input_size"]) == ("imagenet", 224)
