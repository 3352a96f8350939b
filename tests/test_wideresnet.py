"""CIFAR-10 WideResNet classifiers: parity with the official PyTorch outputs, full-size key lists,
and refusal of bad checkpoints."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpure_jax import checkpoint, models
from diffpure_jax.convert.classifiers import (
    VARIANTS,
    classifier_state_dict,
    convert_classifier,
    expected_torch_keys,
)
from diffpure_jax.convert.common import ConversionError
from diffpure_jax.models.wideresnet import _normalize_cifar10

torch = pytest.importorskip("torch")

# reference name -> (variant, small architecture overrides)
CASES = {
    "wrn28_10_cifar10_standard": ("robustbench-wrn", {"depth": 16, "widen_factor": 2}),
    "wrn70_16_dropout_cifar10": (
        "diffpure-wrn-dropout",
        {"depth": 16, "widen_factor": 2, "drop_rate": 0.3},
    ),
    "dm_wrn70_16_cifar10": ("robustbench-dm-wrn", {"depth": 16, "width": 1}),
}


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _load(directory):
    config = checkpoint.read_config(str(directory))
    module = models.build_model(config["architecture"], config["kwargs"])
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return module, checkpoint.load_variables(str(directory), abstract), config


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory):
    """Each small reference checkpoint converted once: name -> output directory."""
    out = {}
    for name, (variant, overrides) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        convert_classifier(str(reference_dir / f"{name}_small.pth"), str(d), variant, **overrides)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_small_parity(name, converted, reference_dir):
    module, variables, config = _load(converted[name])
    variant, overrides = CASES[name]
    assert config["kind"] == "classifier"
    assert config["source"] == {"file": f"{name}_small.pth", "variant": variant}
    assert config["input_shape"] == [32, 32, 3]
    assert all(config["kwargs"][k] == v for k, v in overrides.items())
    io = np.load(reference_dir / f"{name}_small_io.npz")
    logits = np.asarray(module.apply(variables, _nhwc(io["x"])))
    ref = io["logits"]
    assert logits.shape == ref.shape and logits.dtype == np.float32
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"{name}: max relative error {rel:.3g}"


def test_dropout_normalization(reference_dir):
    io = np.load(reference_dir / "wrn70_16_dropout_cifar10_small_io.npz")
    got = np.asarray(_normalize_cifar10(_nhwc(io["x"])))
    np.testing.assert_allclose(got, np.transpose(io["x_normalized"], (0, 2, 3, 1)), atol=1e-6)


def test_dropout_train_mode(converted):
    """train=True runs with batch statistics and a dropout rng; eval ignores dropout."""
    module, variables, _ = _load(converted["wrn70_16_dropout_cifar10"])
    x = jnp.full((2, 32, 32, 3), 0.5)
    eval_out = module.apply(variables, x)
    a, updates = module.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
    b, _ = module.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    assert a.shape == eval_out.shape == (2, 10)
    assert not np.allclose(a, b)
    assert set(updates) == {"batch_stats"}


@pytest.mark.parametrize("name", list(CASES))
def test_full_size_keys(name, reference_dir):
    variant, _ = CASES[name]
    full = json.loads((reference_dir / f"{name}_full_keys.json").read_text())
    want = {
        k: tuple(shape)
        for k, shape, _ in full["state_dict"]
        if not k.endswith("num_batches_tracked")
    }
    got = expected_torch_keys(variant)
    assert sorted(set(want) - set(got)) == [], "missing from the Flax model"
    assert sorted(set(got) - set(want)) == [], "unused by the Flax model"
    assert got == want
    n_params = sum(int(np.prod(s)) for k, s in got.items() if "running_" not in k)
    assert n_params == full["n_params"]


def test_variants_have_full_defaults():
    assert VARIANTS["robustbench-wrn"][1]["depth"] == 28
    assert VARIANTS["diffpure-wrn-dropout"][1]["drop_rate"] == 0.3
    assert VARIANTS["robustbench-dm-wrn"][0] == "dm_wideresnet"


def test_unwrap_prefixes():
    t = torch.zeros(2)
    sd = classifier_state_dict(
        {"state_dict": {"module.a.weight": t, "b.bias": t}}, "robustbench-wrn"
    )
    assert set(sd) == {"a.weight", "b.bias"}
    sd = classifier_state_dict({"model.a.weight": t}, "robustbench-wrn")
    assert set(sd) == {"a.weight"}
    sd = classifier_state_dict({"module.a.weight": t, "c.weight": t}, "diffpure-wrn-dropout")
    assert set(sd) == {"a.weight", "c.weight"}  # keys without the prefix are kept whole
    sd = classifier_state_dict({"model_state_dict": {"module.0.x.y": t}}, "robustbench-dm-wrn")
    assert set(sd) == {"x.y"}
    # the DM loader needs its wrapper; the error names what the file holds
    with pytest.raises(ConversionError, match=r"model_state_dict.*'state_dict', 'epoch'"):
        classifier_state_dict({"state_dict": {"a": t}, "epoch": 3}, "robustbench-dm-wrn")
    with pytest.raises(ConversionError, match="'state_dict'"):
        classifier_state_dict({"state_dict": {"module.a": t}}, "diffpure-wrn-dropout")


def test_bad_state_dict_names_every_problem(reference_dir, tmp_path):
    ckpt = torch.load(reference_dir / "wrn28_10_cifar10_standard_small.pth", weights_only=True)
    sd = dict(ckpt["state_dict"])
    del sd["module.block2.layer.1.conv1.weight"]
    sd["module.block9.extra.weight"] = torch.zeros(3)
    sd["module.fc.bias"] = torch.zeros(11)
    src = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(ConversionError) as e:
        convert_classifier(
            str(src), str(tmp_path / "out"), "robustbench-wrn", depth=16, widen_factor=2
        )
    msg = str(e.value)
    assert "block2.layer.1.conv1.weight" in msg
    assert "block9.extra.weight" in msg
    assert "fc.bias: expected (10,), got (11,)" in msg
    assert not (tmp_path / "out" / "config.json").exists()


def test_wrong_size_is_refused(reference_dir, tmp_path):
    with pytest.raises(ConversionError, match="missing keys"):
        convert_classifier(
            str(reference_dir / "wrn28_10_cifar10_standard_small.pth"),
            str(tmp_path / "out"),
            "robustbench-wrn",
        )


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / "noise.pth"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ConversionError):
        convert_classifier(str(src), str(tmp_path / "out"), "robustbench-wrn")


class _RunsCode:
    """Unpickling this would call print(...): harmless, but a weights-only loader must refuse."""

    def __reduce__(self):
        return (print, ("UNPICKLED-CODE-RAN",))


def test_code_running_pickle_is_refused(tmp_path, capsys):
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": _RunsCode()}, src)
    with pytest.raises(ConversionError, match="refused"):
        convert_classifier(str(src), str(tmp_path / "out"), "robustbench-wrn")
    assert "UNPICKLED-CODE-RAN" not in capsys.readouterr().out
