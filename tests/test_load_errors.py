"""Every loading and input error is short and says what to do: corrupt or edited config.json,
missing checkpoints, out-of-range images (eager and inside `jax.jit`, as the README calls it)."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_score

from diffpure_jax import Classifier, DefendedClassifier, Purifier, PurifyConfig, purify
from diffpure_jax.checkpoint import CheckpointError, CheckpointNotFoundError, save_variables
from diffpure_jax.load import load_classifier, load_score_model
from diffpure_jax.models import build_model
from diffpure_jax.purify import ImageRangeError

SHIPPED = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints")
WRN = {"depth": 10, "widen_factor": 1, "num_classes": 10}
MISMATCH = "the config.json's architecture (fields 'architecture', 'kwargs') does not match"
FIX = "re-convert or restore config.json"
RANGE = "images must be in [0, 1]"


@pytest.fixture(scope="module")
def wrn_dir(tmp_path_factory):
    """A WideResNet-10-1 with random weights for 8x8x1 images, saved as a checkpoint."""
    variables = build_model("wideresnet", WRN).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    path = str(tmp_path_factory.mktemp("ckpt") / "wrn")
    config = {"kind": "classifier", "architecture": "wideresnet", "kwargs": WRN}
    save_variables(path, variables, {**config, "input_shape": [8, 8, 1]})
    return path


def _copy(src, tmp_path, edit=None):
    """A copy of the checkpoint `src` under tmp_path, its config.json changed by `edit`."""
    dst = str(tmp_path / os.path.basename(os.path.normpath(src)))
    shutil.copytree(src, dst)
    if edit is not None:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            config = json.load(f)
        edit(config)
        with open(path, "w") as f:
            json.dump(config, f)
    return dst


def _one_short_line(e: pytest.ExceptionInfo, limit: int = 600) -> str:
    message = str(e.value)
    assert "\n" not in message and len(message) < limit, message
    return message


def test_corrupt_config_names_the_file(wrn_dir, tmp_path):
    d = _copy(wrn_dir, tmp_path)
    path = os.path.join(d, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])  # truncated
    with pytest.raises(CheckpointError) as e:
        load_classifier(d)
    message = _one_short_line(e)
    assert path in message and "not valid JSON" in message and "line" in message
    with open(path, "wb") as f:
        f.write(b"\xff\xfe binary")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_classifier(d)


@pytest.mark.parametrize(
    "kwargs, count, first",
    [
        # more blocks per group: the stored tree lacks layer.1 of each of the three groups
        ({"depth": 16}, 30, "batch_stats/block1/layer.1/bn1/mean (16,) built but not stored"),
        ({"num_classes": 5}, 2, "params/fc/bias stored (10,), built (5,)"),
        ({"widen_factor": 2}, None, "stored (16,), built (32,)"),
    ],
)
def test_edited_architecture_lists_the_mismatching_keys(wrn_dir, tmp_path, kwargs, count, first):
    d = _copy(wrn_dir, tmp_path, lambda c: c["kwargs"].update(kwargs))
    with pytest.raises(CheckpointError) as e:
        load_classifier(d)
    message = _one_short_line(e)
    assert message.startswith(os.path.join(d, "config.json") + ": " + MISMATCH)
    assert FIX in message and first in message
    if count is not None:
        assert f"{count} mismatching keys" in message


def test_edited_score_architecture_lists_the_mismatching_keys(tmp_path):
    d = _copy(
        os.path.join(SHIPPED, "fmnist-ncsnpp-small"), tmp_path, lambda c: c["kwargs"].update(nf=8)
    )
    with pytest.raises(CheckpointError) as e:
        load_score_model(d)
    message = _one_short_line(e)
    assert MISMATCH in message and FIX in message
    assert "params/all_modules.0/bias stored (64,), built (32,)" in message
    assert "more)" in message  # only the first few keys are listed


@pytest.mark.parametrize(
    "edit, field, detail",
    [
        (lambda c: c["kwargs"].update(depth=11), "'kwargs'", "6n+4"),
        (lambda c: c["kwargs"].update(dropout=0.1), "'kwargs'", "unexpected keyword argument"),
        (lambda c: c.update(architecture="alexnet"), "'architecture'", "unknown architecture"),
        (lambda c: c.pop("input_shape"), "'input_shape'", "missing"),
        (lambda c: c.update(kind="scorer"), "'kind'", "'scorer'"),
        (lambda c: c.update(kwargs=[10, 1]), "'kwargs'", "[10, 1]"),
    ],
)
def test_invalid_config_names_the_field(wrn_dir, tmp_path, edit, field, detail):
    d = _copy(wrn_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_classifier(d)
    message = _one_short_line(e)
    assert message.startswith(os.path.join(d, "config.json") + ": ")
    assert f"field {field}" in message or f"fields {field}" in message, message
    assert detail in message and "restore config.json or re-convert" in message


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    missing = str(tmp_path / "cifar10-wrn-28-10")
    with pytest.raises(CheckpointNotFoundError) as e:
        load_classifier(missing)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    message = _one_short_line(e)
    assert message.startswith(f"no classifier checkpoint at {missing!r} (does not exist)")
    assert f"python -m diffpure_jax.convert robustbench-wrn Standard.pt {missing}" in message
    # A directory not named after an official checkpoint: the generic advice of its kind.
    other = str(tmp_path / "mine")
    with pytest.raises(CheckpointNotFoundError) as e:
        load_classifier(other)
    message = _one_short_line(e)
    assert "python -m experiments.train_classifier" in message and "robustbench-wrn" in message
    with pytest.raises(CheckpointNotFoundError) as e:
        load_score_model(str(tmp_path / "imagenet-adm-256-uncond"))
    assert "convert guided-diffusion 256x256_diffusion_uncond.pt" in _one_short_line(e)
    assert "checkpoints/README.md" in message and "score" not in message

    with pytest.raises(CheckpointNotFoundError) as e:
        load_score_model(str(tmp_path))  # exists, but no config.json
    message = _one_short_line(e)
    assert message.startswith(
        f"no score model checkpoint at {str(tmp_path)!r} (has no config.json)"
    )
    assert "python -m diffpure_jax.convert score-sde checkpoint_8.pth" in message
    assert "python -m experiments.train_score" in message and "robustbench" not in message


def test_wrong_kind_says_which_loader(wrn_dir):
    with pytest.raises(CheckpointError) as e:
        load_score_model(wrn_dir)
    message = _one_short_line(e)
    assert "holds a classifier" in message and "field 'kind'" in message
    assert "load it with load_classifier" in message


def test_incomplete_checkpoint(wrn_dir, tmp_path):
    d = _copy(wrn_dir, tmp_path)
    shutil.rmtree(os.path.join(d, "variables"))
    with pytest.raises(CheckpointNotFoundError, match="is incomplete; re-convert it"):
        load_classifier(d)


def _linear_classifier(shape=(4, 4, 3)):
    weights = jax.random.normal(jax.random.key(5), (int(np.prod(shape)), 3))
    return Classifier(weights, lambda w, x: x.reshape(x.shape[0], -1) @ w, shape)


def _assert_short_range_error(e: pytest.ExceptionInfo):
    """Our message is the last line of a short error, without equinox's banner."""
    message = str(e.value)
    assert message.splitlines()[-1].startswith(f"ImageRangeError: {RANGE}, got values in ")
    assert "divide uint8 images by 255" in message
    assert len(message) < 500 and "filter_jit" not in message, message


def test_classifier_refuses_bad_images():
    classifier = _linear_classifier()
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    with pytest.raises(ImageRangeError) as e:
        classifier(255.0 * x)
    assert str(e.value).startswith(f"{RANGE}, got values in [") and "\n" not in str(e.value)
    with pytest.raises(ImageRangeError, match=r"in \[0, 1\]"):
        classifier(x - 0.5)
    with pytest.raises(ValueError, match=r"NHWC \(B, 4, 4, 3\)"):
        classifier(jnp.transpose(x, (0, 3, 1, 2)))
    with pytest.raises(ValueError, match="floating point"):
        classifier((255 * x).astype(jnp.uint8))
    with pytest.raises(Exception) as e:  # inside jit, as the README calls models
        jax.jit(lambda c, x: c(x))(classifier, x + 0.5)
    _assert_short_range_error(e)


def test_classifier_check_false_keeps_the_numbers(caplog):
    classifier = _linear_classifier()
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    expected = np.asarray(classifier.apply_fn(classifier.variables, x))
    np.testing.assert_array_equal(classifier(x), expected)
    np.testing.assert_array_equal(jax.jit(lambda c, x: c(x))(classifier, x), expected)
    np.testing.assert_array_equal(jax.jit(lambda c, x: c(x, check=False))(classifier, x), expected)
    grad = jax.grad(lambda x: classifier(x).sum())(x)
    np.testing.assert_array_equal(grad, jax.grad(lambda x: classifier(x, check=False).sum())(x))
    outside = 1.5 * x - 0.2  # e.g. purified images, which are not clipped
    np.testing.assert_array_equal(
        classifier(outside, check=False), classifier.apply_fn(classifier.variables, outside)
    )


@pytest.mark.parametrize("grad", ["exact", "blind"])
def test_in_jit_range_error_is_short(grad, caplog):
    defended = DefendedClassifier(
        Purifier(gaussian_score(), PurifyConfig(t_star=0.05, dt=0.01, grad=grad)),
        _linear_classifier(),
    )
    x = jnp.full((2, 4, 4, 3), 255.0)  # uint8 values, not divided by 255
    key = jax.random.key(0)
    with caplog.at_level(logging.ERROR), pytest.raises(Exception) as e:
        jax.jit(lambda m, x, k: m(x, k))(defended, x, key).block_until_ready()
    _assert_short_range_error(e)
    assert "got values in [255, 255]" in str(e.value)
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    with pytest.raises(Exception) as e:  # and under jax.grad, the attacks' way
        jax.jit(jax.grad(lambda x: defended(x, key).sum()))(x - 255.5).block_until_ready()
    _assert_short_range_error(e)


@pytest.mark.parametrize("grad", ["exact", "bpda", "blind"])
def test_defended_classifier_accepts_purified_images_outside_unit_range(grad):
    """The classifier's check guards the input x, not the purified images (not clipped)."""
    score, config = gaussian_score(), PurifyConfig(t_star=0.05, dt=0.01, grad=grad)
    classifier = _linear_classifier()
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    key = jax.random.key(2)
    purified = purify(score, config, x, key)
    assert float(purified.min()) < 0.0 and float(purified.max()) > 1.0  # leaves [0, 1]
    defended = DefendedClassifier(Purifier(score, config), classifier)
    expected = classifier(purified, check=False)
    np.testing.assert_allclose(defended(x, key), expected, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(lambda m, x, k: m(x, k))(defended, x, key), expected, rtol=1e-5, atol=1e-5
    )
