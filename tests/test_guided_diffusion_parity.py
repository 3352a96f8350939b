"""The converted guided-diffusion (ADM) UNet reproduces the official PyTorch outputs.

Reference: the small ImageNet-style model of guided_imagenet256_small_* (64x64, model_channels
32, channel_mult 1,1,2, one residual block per level, attention at ds 2 and 4 with 16-channel
heads); the full 256x256 model is checked by its key names and shapes.
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

from diffpure_jax.checkpoint import load_variables, read_config
from diffpure_jax.convert.__main__ import main
from diffpure_jax.convert.common import ConversionError, KeyMismatchError, load_torch_file
from diffpure_jax.convert.guided_diffusion import (
    convert_guided_diffusion,
    expected_torch_keys,
    guided_diffusion_state_dict,
    infer_architecture,
)
from diffpure_jax.models import build_model
from diffpure_jax.models.guided_unet import ADM_IMAGENET256
from diffpure_jax.score import with_score_dtype

TOL = 1e-5
# Options no shape depends on: given explicitly for the small model.
UNREAD = {"num_head_channels": 16, "image_size": 64}
SMALL = {
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 6,
    "num_res_blocks": 1,
    "channel_mult": [1, 1, 2],
    "attention_resolutions": [2, 4],
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}
# bfloat16 (8 significant bits) vs float32 on the small reference, measured on CPU: max abs
# 6.6e-2, max relative (helpers.max_rel_err) 2.3e-2. The official float16 torso differs from
# float32 by 6.6e-3 abs / 2.3e-3 relative; bfloat16 has 3 fewer mantissa bits (8x coarser).
BF16_MAX_REL = 3.5e-2
BF16_MIN_REL = 1e-4  # a network still run in float32 would be ~1e-7 off


def to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def small_pth(reference_dir):
    return str(reference_dir / "guided_imagenet256_small.pth")


@pytest.fixture(scope="module")
def io(reference_dir):
    return np.load(reference_dir / "guided_imagenet256_small_io.npz")


@pytest.fixture(scope="module")
def converted(small_pth, tmp_path_factory):
    """(out_dir, config) of the small .pth converted once, sizes read from the file."""
    out = str(tmp_path_factory.mktemp("adm") / "small")
    return out, convert_guided_diffusion(small_pth, out, infer=True, **UNREAD)


@pytest.fixture(scope="module")
def network(converted, io):
    """(model, variables, jitted apply, x NHWC, timesteps) of the converted small model."""
    out_dir, _ = converted
    config = read_config(out_dir)
    model = build_model(config["architecture"], config["kwargs"])
    x, t = nhwc(io["x"]), jnp.asarray(io["timesteps"], jnp.int32)
    variables = load_variables(out_dir, jax.eval_shape(model.init, jax.random.key(0), x, t))
    return model, variables, jax.jit(model.apply), x, t


@pytest.fixture(scope="module")
def out_f32(network):
    _, variables, apply, x, t = network
    return np.asarray(apply(variables, x, t))


def test_network_output_float32(out_f32, io):
    assert out_f32.shape == (4, 64, 64, 6) and out_f32.dtype == np.float32
    err = max_rel_err(to_nchw(out_f32), io["out"])
    print(f"guided UNet float32 vs official: max rel err {err:.1e}")
    assert err <= TOL


def test_full_size_keys(reference_dir):
    ref = json.loads((reference_dir / "guided_imagenet256_full_keys.json").read_text())
    want = {key: tuple(shape) for key, shape, _ in ref["state_dict"]}
    got = expected_torch_keys()
    assert len(want) == 566
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == ref["n_params"] == 552_814_086
    # the full architecture is read back from the key names and shapes alone
    shapes = {key: types.SimpleNamespace(shape=shape) for key, shape in want.items()}
    unread = ("image_size", "num_head_channels", "dropout")
    assert infer_architecture(shapes) == {
        k: v for k, v in ADM_IMAGENET256.items() if k not in unread
    }


def test_config_and_inferred_architecture(converted, small_pth, tmp_path):
    _, config = converted
    assert config["kind"] == "score" and config["architecture"] == "guided_unet"
    assert config["kwargs"] == {**ADM_IMAGENET256, **SMALL, **UNREAD}
    assert config["input_shape"] == [64, 64, 3]
    assert config["parameterization"] == "guided_diffusion"
    assert config["sde"] == {"beta_min": 0.1, "beta_max": 20.0, "n_discrete": 1000}
    assert config["source"] == {"file": "guided_imagenet256_small.pth", "inferred": SMALL}
    state_dict = guided_diffusion_state_dict(load_torch_file(small_pth))
    assert infer_architecture(state_dict) == SMALL
    assert infer_architecture({"conv.weight": np.zeros((3, 3))}) == {}
    # a DataParallel 'module.' prefix is stripped
    prefixed = str(tmp_path / "prefixed.pth")
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}, prefixed)
    cfg = convert_guided_diffusion(prefixed, str(tmp_path / "p"), infer=True, **UNREAD)
    assert cfg["kwargs"] == config["kwargs"]


def test_wrong_architecture_is_refused(small_pth, tmp_path):
    # the full-size defaults: every shape differs
    with pytest.raises(KeyMismatchError) as e:
        convert_guided_diffusion(small_pth, str(tmp_path / "a"), **UNREAD)
    message = str(e.value)
    assert len(message.splitlines()) == 2 and len(message) < 1000, message
    assert re.search(r"\d+ missing keys", message) and re.search(r"\d+ misshaped keys", message)
    assert "--arch" in message and "model_channels=32" in message
    # one option wrong, the rest read from the file
    with pytest.raises(KeyMismatchError, match=r"\d+ unexpected keys") as e:
        convert_guided_diffusion(
            small_pth, str(tmp_path / "b"), infer=True, num_res_blocks=2, **UNREAD
        )
    assert e.value.missing and "num_res_blocks=1" in str(e.value)
    with pytest.raises(ConversionError, match="do not make a model"):
        convert_guided_diffusion(small_pth, str(tmp_path / "c"), infer=True, num_head_channels=24)
    with pytest.raises(ConversionError, match="unknown guided-diffusion option"):
        convert_guided_diffusion(small_pth, str(tmp_path / "d"), num_heads=4)


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
    with pytest.raises(ConversionError, match="not a guided-diffusion state_dict") as e:
        convert_guided_diffusion(path, str(tmp_path / "out"))
    assert len(str(e.value).splitlines()) == 1


def test_cli(small_pth, tmp_path, network, io, capsys):
    out = tmp_path / "cli"
    arch = ["--arch", "num_head_channels=16", "image_size=64"]
    assert main(["guided-diffusion", small_pth, str(out), *arch]) == 0
    printed = capsys.readouterr().out
    assert "guided_unet" in printed and "read from the file: in_channels=3" in printed
    model, _, apply, x, t = network
    assert read_config(str(out))["source"]["inferred"] == SMALL
    variables = load_variables(str(out), jax.eval_shape(model.init, jax.random.key(0), x, t))
    assert max_rel_err(to_nchw(apply(variables, x, t)), io["out"]) <= TOL
    wrong = ["--arch", "channel_mult=[1,2]"]
    err = refusal(capsys, main, ["guided-diffusion", small_pth, str(tmp_path / "w"), *wrong])
    assert "does not match the architecture" in err and "channel_mult=[1,1,2]" in err


def _dtypes(jaxpr, op: str) -> set[str]:
    """'dtype[shape]' of every output of primitive `op` in a (nested) jaxpr's text."""
    return set(re.findall(rf":(\w+\[[\d,]*\]) = {op}\b", str(jaxpr)))


def test_bfloat16(network, out_f32, io):
    model, variables, _, x, t = network
    low = with_score_dtype(lambda v, x, t: model.apply(v, x, t), "bfloat16")
    jaxpr = jax.make_jaxpr(low)(variables, x, t)
    # every convolution in bf16; GroupNorm statistics (rsqrt) and the attention softmax (the exp
    # of the (B, heads, T, T) logits: 2 heads of 32x32 tokens, 4 heads of 16x16) in float32
    assert {d.split("[")[0] for d in _dtypes(jaxpr, "conv_general_dilated")} == {"bf16"}
    assert {d.split("[")[0] for d in _dtypes(jaxpr, "rsqrt")} == {"f32"}
    exps = {d for d in _dtypes(jaxpr, "exp") if d.count(",") == 3}
    assert exps == {"f32[4,2,1024,1024]", "f32[4,4,256,256]"}, exps
    out = np.asarray(jax.jit(low)(variables, x, t))
    assert out.dtype == np.float32
    diff = np.abs(out - out_f32)
    rel = max_rel_err(out, out_f32)
    official = max_rel_err(io["out_fp16_torso_cpu"], io["out"])
    print(
        f"bf16 vs f32: max abs {diff.max():.2e}, max rel {rel:.2e} "
        f"(official fp16 torso vs f32: max rel {official:.2e})"
    )
    assert BF16_MIN_REL < rel <= BF16_MAX_REL
