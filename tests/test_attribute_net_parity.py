"""CelebA-HQ attribute classifier (DiffPure `celebahq__<Attr>`): parity of the small reference
net (resolution 32, fed 64x64 images so the box downsampling runs) with the official PyTorch
outputs, the normalised/downsampled input, the full-size key list, the resolution read from the
'RxR.conv0' keys and refusal of a bare state_dict or a wrong size."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import max_rel_err, nhwc

from diffpure_jax import load_classifier
from diffpure_jax.checkpoint import read_config
from diffpure_jax.convert.classifiers import (
    VARIANTS,
    classifier_state_dict,
    convert_classifier,
    expected_torch_keys,
    infer_architecture,
)
from diffpure_jax.convert.common import ConversionError, KeyMismatchError, load_torch_file
from diffpure_jax.models.attribute_net import downsample

torch = pytest.importorskip("torch")

VARIANT = "celebahq-attribute"
NAME = "celebahq_attribute_classifier"
SIZES = {"resolution": 32, "num_channels": 3, "fmap_base": 256, "fmap_max": 32, "use_mbstd": False}
MAX_CHARS = 600  # a refusal's length, as in test_convert_errors


@pytest.fixture(scope="module")
def converted(reference_dir, tmp_path_factory):
    """The small reference checkpoint converted once (sizes read from it, 64x64 input)."""
    out = str(tmp_path_factory.mktemp("attr") / "small")
    src = str(reference_dir / f"{NAME}_small.pth")
    convert_classifier(src, out, VARIANT, infer=True, input_size=64)
    return out


@pytest.fixture(scope="module")
def io(reference_dir):
    return np.load(reference_dir / f"{NAME}_small_io.npz")


def test_small_parity(converted, io):
    config = read_config(converted)
    assert config["architecture"] == "attribute_net" and config["input_shape"] == [64, 64, 3]
    assert config["kwargs"] == {**VARIANTS[VARIANT][1], **SIZES, "input_size": 64}
    assert config["source"]["inferred"] == SIZES
    logits = np.asarray(load_classifier(converted)(nhwc(io["x"])))
    assert logits.shape == (4, 2) and logits.dtype == np.float32
    err = max_rel_err(logits, io["logits"])
    assert err <= 1e-5, f"max relative error {err:.3g}"
    # [logit, -logit]; column 1 (-logit) is the attribute present: DiffPure's `softmaxed`
    np.testing.assert_array_equal(logits[:, 1], -logits[:, 0])
    assert max_rel_err(logits[:, :1], io["logit"]) <= 1e-5
    softmaxed = np.asarray(jax.nn.softmax(logits, axis=1)[:, 1])
    np.testing.assert_allclose(softmaxed, io["softmaxed"], rtol=0, atol=1e-6)


def test_normalised_and_downsampled_input(io):
    x = (nhwc(io["x"]) - 0.5) / 0.5
    np.testing.assert_allclose(x, io["x_normalized"].transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    got = np.asarray(downsample(x, 32))
    np.testing.assert_allclose(got, io["x_downsampled"].transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    assert downsample(x, 64) is x  # the identity at the net's size (DiffPure's 256 -> 256)
    with pytest.raises(ValueError, match="multiple of its resolution"):
        downsample(x[:, :48, :48], 32)


def test_full_size_keys(reference_dir):
    full = json.loads((reference_dir / f"{NAME}_full_keys.json").read_text())
    want = {k: tuple(shape) for k, shape, _ in full["state_dict"] if k != "lod_in"}
    got = expected_torch_keys(VARIANT)
    assert sorted(set(want) - set(got)) == [], "missing from the Flax model"
    assert sorted(set(got) - set(want)) == [], "unused by the Flax model"
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == full["n_params"]


def test_sizes_are_read_from_the_keys(reference_dir):
    ckpt = load_torch_file(str(reference_dir / f"{NAME}_small.pth"))
    sd = classifier_state_dict(ckpt, VARIANT)
    assert "lod_in" in sd and infer_architecture(VARIANT, sd) == SIZES
    full = json.loads((reference_dir / f"{NAME}_full_keys.json").read_text())
    sd = {k: np.zeros(shape, np.float32) for k, shape, _ in full["state_dict"]}
    defaults = VARIANTS[VARIANT][1]
    assert infer_architecture(VARIANT, sd) == {k: defaults[k] for k in SIZES}
    # the official max_res_from_state_dict: the first missing 'RxR.conv0' ends the count
    del sd["32x32.conv0.conv.weight"]
    assert infer_architecture(VARIANT, sd)["resolution"] == 16
    assert infer_architecture(VARIANT, {"conv1.weight": np.zeros((8, 3, 3, 3))}) == {}
    # the minibatch-stddev channel (not in DiffPure's nets) widens the head's conv input by one
    small = {"resolution": 8, "num_channels": 1, "fmap_base": 32, "fmap_max": 16}
    keys = expected_torch_keys(VARIANT, **small, use_mbstd=True)
    assert keys["4x4.conv.conv.weight"] == (16, 17, 3, 3)
    sd = {k: np.zeros(shape, np.float32) for k, shape in keys.items()}
    assert infer_architecture(VARIANT, sd) == {**small, "use_mbstd": True}


def _short(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert len(msg.splitlines()) <= 2 and len(msg) < MAX_CHARS, msg
    return msg


def test_bare_state_dict_is_refused(reference_dir, tmp_path):
    sd = torch.load(reference_dir / f"{NAME}_small.pth", weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "bare.pth")
    with pytest.raises(ConversionError, match="'state_dict' entry") as e:
        convert_classifier(str(tmp_path / "bare.pth"), str(tmp_path / "o"), VARIANT)
    assert "'lod_in'" in _short(e)
    assert not (tmp_path / "o").exists()


def test_wrong_size_is_refused(reference_dir, tmp_path):
    src = str(reference_dir / f"{NAME}_small.pth")
    with pytest.raises(KeyMismatchError, match="missing keys") as e:
        convert_classifier(src, str(tmp_path / "o"), VARIANT)  # the full 256 defaults
    assert "pass --arch resolution=32 fmap_base=256 fmap_max=32" in _short(e)
    with pytest.raises(KeyMismatchError, match="misshaped keys") as e:
        convert_classifier(src, str(tmp_path / "o"), VARIANT, resolution=32, fmap_base=256)
    assert "pass --arch fmap_max=32" in _short(e)
    assert not (tmp_path / "o").exists()
