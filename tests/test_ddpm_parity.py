"""The converted SDEdit/DDPM UNet (CelebA-HQ) reproduces the official PyTorch outputs (float32).

Reference: the small model of ddpm_celebahq256_small_* (64x64, ch 32, ch_mult 1,1,2, one
residual block per level, attention at 16x16); the full 256x256 model is checked by its key names
and shapes.
"""

import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import max_rel_err, nhwc, refusal

from diffpure_jax.checkpoint import OFFICIAL, load_variables, read_config
from diffpure_jax.convert.__main__ import main
from diffpure_jax.convert.common import ConversionError, KeyMismatchError, load_torch_file
from diffpure_jax.convert.ddpm import (
    DDPM,
    convert_ddpm,
    ddpm_state_dict,
    expected_torch_keys,
    infer_architecture,
)
from diffpure_jax.models import build_model
from diffpure_jax.models.ddpm_unet import SDEDIT_CELEBAHQ256

TOL = 1e-5
# What the small file's shapes give; image_size is not in the file (attn_resolutions is read once
# image_size is known).
SMALL = {
    "in_channels": 3,
    "ch": 32,
    "out_ch": 3,
    "num_res_blocks": 1,
    "ch_mult": [1, 1, 2],
    "resamp_with_conv": True,
    "attn_resolutions": [16],
}


def to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def small_pth(reference_dir):
    return str(reference_dir / "ddpm_celebahq256_small.pth")


@pytest.fixture(scope="module")
def io(reference_dir):
    return np.load(reference_dir / "ddpm_celebahq256_small_io.npz")


@pytest.fixture(scope="module")
def converted(small_pth, tmp_path_factory):
    """(out_dir, config) of the small .pth converted once, sizes read from the file."""
    out = str(tmp_path_factory.mktemp("ddpm") / "small")
    return out, convert_ddpm(small_pth, out, infer=True, image_size=64)


@pytest.fixture(scope="module")
def network(converted, io):
    """(model, jitted apply, x NHWC, t) of the converted small model's architecture."""
    config = read_config(converted[0])
    model = build_model(config["architecture"], config["kwargs"])
    return model, jax.jit(model.apply), nhwc(io["x"]), jnp.asarray(io["t"], jnp.int32)


def _load(out_dir, network):
    model, _, x, t = network
    return load_variables(out_dir, jax.eval_shape(model.init, jax.random.key(0), x, t))


def test_network_output(converted, network, io):
    _, apply, x, t = network
    out = np.asarray(apply(_load(converted[0], network), x, t))
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.float32
    errs = [max_rel_err(to_nchw(out)[i], io["out"][i]) for i in range(len(t))]
    print(f"DDPM UNet float32 vs official at t={io['t'].tolist()}: max rel err {errs}")
    assert max(errs) <= TOL and max_rel_err(to_nchw(out), io["out"]) <= TOL


def test_full_size_keys(reference_dir):
    ref = json.loads((reference_dir / "ddpm_celebahq256_full_keys.json").read_text())
    want = {key: tuple(shape) for key, shape, _ in ref["state_dict"]}
    got = expected_torch_keys()
    assert len(want) == 450
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == ref["n_params"] == 113_673_219
    # the full architecture is read back from the key names and shapes (image_size given)
    shapes = {key: types.SimpleNamespace(shape=shape) for key, shape in want.items()}
    unread = ("image_size", "dropout")
    full = {k: v for k, v in SDEDIT_CELEBAHQ256.items() if k not in unread}
    assert infer_architecture(shapes, image_size=256) == full
    assert infer_architecture(shapes) == {k: v for k, v in full.items() if k != "attn_resolutions"}


def test_config_and_inferred_architecture(converted, small_pth, tmp_path):
    _, config = converted
    assert config["kind"] == "score" and config["architecture"] == "ddpm_unet"
    assert config["kwargs"] == {**SDEDIT_CELEBAHQ256, **SMALL, "image_size": 64}
    assert config["input_shape"] == [64, 64, 3]
    assert config["parameterization"] == "ddpm_eps"
    assert (
        config["ddpm"]
        == DDPM
        == {
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "num_timesteps": 1000,
            "var_type": "fixedsmall",
        }
    )
    assert config["source"] == {"file": "ddpm_celebahq256_small.pth", "inferred": SMALL}
    assert read_config(converted[0]) == config
    assert OFFICIAL["celebahq-ddpm-256"] == ("ddpm-celebahq", "celeba_hq.ckpt")
    state_dict = ddpm_state_dict(load_torch_file(small_pth))
    assert infer_architecture(state_dict, 64) == SMALL
    assert infer_architecture({"conv.weight": np.zeros((3, 3))}) == {}
    # a DataParallel 'module.' prefix is stripped
    prefixed = str(tmp_path / "prefixed.pth")
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}, prefixed)
    cfg = convert_ddpm(prefixed, str(tmp_path / "p"), infer=True, image_size=64)
    assert cfg["kwargs"] == config["kwargs"]


def test_wrong_architecture_is_refused(small_pth, tmp_path):
    # the full-size defaults: most shapes differ
    with pytest.raises(KeyMismatchError) as e:
        convert_ddpm(small_pth, str(tmp_path / "a"), image_size=64)
    message = str(e.value)
    assert len(message.splitlines()) == 2 and len(message) < 1000, message
    assert re.search(r"\d+ missing keys", message) and re.search(r"\d+ misshaped keys", message)
    assert "--arch" in message and "ch=32" in message
    # one option wrong, the rest read from the file
    with pytest.raises(KeyMismatchError, match=r"\d+ missing keys") as e:
        convert_ddpm(small_pth, str(tmp_path / "b"), infer=True, image_size=64, num_res_blocks=2)
    assert e.value.misshaped and not e.value.unexpected
    assert "pass --arch num_res_blocks=1" in str(e.value)
    # image_size left at 256: no attention at the file's level 2; the hint asks for image_size
    with pytest.raises(KeyMismatchError, match="image_size=S") as e:
        convert_ddpm(small_pth, str(tmp_path / "c"), infer=True)
    assert e.value.unexpected and not e.value.missing and not e.value.misshaped
    with pytest.raises(ConversionError, match="do not make a model"):
        convert_ddpm(small_pth, str(tmp_path / "d"), infer=True, ch=48)
    with pytest.raises(ConversionError, match="unknown DDPM UNet option"):
        convert_ddpm(small_pth, str(tmp_path / "e"), num_heads=4)


@pytest.mark.parametrize(
    "obj",
    [
        {"model": {"w": torch.zeros(1)}, "step": 3},  # a training checkpoint, not a state_dict
        [torch.zeros(1)],
        {},
    ],
    ids=["wrapped", "list", "empty"],
)
def test_not_a_state_dict_is_refused(obj, tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save(obj, path)
    with pytest.raises(ConversionError, match="not a DDPM UNet state_dict") as e:
        convert_ddpm(path, str(tmp_path / "out"))
    assert len(str(e.value).splitlines()) == 1


def test_cli(small_pth, tmp_path, network, io, capsys):
    out = tmp_path / "cli"
    assert main(["ddpm-celebahq", small_pth, str(out), "--arch", "image_size=64"]) == 0
    printed = capsys.readouterr().out
    assert "ddpm_unet" in printed and "read from the file: in_channels=3, ch=32" in printed
    _, apply, x, t = network
    assert read_config(str(out))["source"]["inferred"] == SMALL
    assert max_rel_err(to_nchw(apply(_load(str(out), network), x, t)), io["out"]) <= TOL
    err = refusal(capsys, main, ["ddpm-celebahq", small_pth, str(tmp_path / "w")])
    assert "does not match the architecture" in err and "--arch image_size=S" in err
