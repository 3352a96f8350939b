"""The converted score_sde NCSN++ reproduces the official PyTorch outputs (float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import max_rel_err, nhwc

from diffpure_jax import PurifyConfig
from diffpure_jax.checkpoint import read_config
from diffpure_jax.convert.common import ConversionError
from diffpure_jax.convert.score_sde import (
    convert_score_sde,
    expected_torch_keys,
    score_sde_state_dict,
)
from diffpure_jax.load import load_score_model
from diffpure_jax.models import build_model
from diffpure_jax.noise import StoredBrownianPath
from diffpure_jax.purify import reverse_solve

TOL = 1e-5


def to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def test_network_output_ema(small_score, small_score_dir, score_io):
    config = read_config(small_score_dir)
    apply = jax.jit(build_model(config["architecture"], config["kwargs"]).apply)
    out = apply(small_score.variables, nhwc(score_io["x"]), jnp.asarray(score_io["labels"]))
    assert max_rel_err(to_nchw(out), score_io["out_ema"]) <= TOL


def test_network_output_model_weights(reference_dir, score_io, tmp_path):
    out_dir = str(tmp_path / "raw")
    convert_score_sde(
        str(reference_dir / "score_sde_cifar10_small.pth"),
        out_dir,
        weights="model",
        nf=16,
        num_res_blocks=2,
    )
    model = load_score_model(out_dir)
    t = jnp.asarray(score_io["t"])
    eps = -model(nhwc(score_io["x"]), t) * model.sde.std(t)[:, None, None, None]
    assert max_rel_err(to_nchw(eps), score_io["out_model"]) <= 1e-4
    # EMA and raw weights really differ: the converter must not confuse them.
    assert max_rel_err(score_io["out_model"], score_io["out_ema"]) > 1e-2


def test_score_and_std(small_score, score_io):
    t = jnp.asarray(score_io["t"])
    assert max_rel_err(small_score.sde.std(t), score_io["std"]) <= TOL
    score = jax.jit(small_score.__call__)(nhwc(score_io["x"]), t)
    assert max_rel_err(to_nchw(score), score_io["score"]) <= TOL


def test_reverse_drift_and_diffusion(small_score, score_io):
    x = nhwc(score_io["x"])
    sde = small_score.sde
    for i in range(len(score_io["sde_s"])):
        t = jnp.asarray(score_io["sde_rev_t"][i])
        # DiffPure's RevVPSDE.f runs time forwards: it is the negated reverse drift.
        f = -sde.reverse_drift(small_score(x, t), x, t[:, None, None, None])
        assert max_rel_err(to_nchw(f), score_io["sde_f"][i]) <= TOL
        assert max_rel_err(sde.diffusion(t), score_io["sde_g"][i]) <= TOL


def test_forward_diffusion_discrete_schedule(small_score, score_io):
    sde = small_score.sde
    assert max_rel_err(sde.discrete_alphas_cumprod(), score_io["alphas_cumprod"]) <= TOL
    t_star = float(score_io["fwd_t_int"]) / 1000
    xt = sde.diffuse(nhwc(score_io["fwd_x0"]), nhwc(score_io["fwd_eps"]), t_star)
    assert max_rel_err(to_nchw(xt), score_io["fwd_xt"]) <= TOL
    # The continuous schedule differs from the paper-exact one by about 1e-3 only.
    xc = sde.diffuse(nhwc(score_io["fwd_x0"]), nhwc(score_io["fwd_eps"]), t_star, "continuous")
    assert 1e-5 < max_rel_err(to_nchw(xc), score_io["fwd_xt"]) < 5e-3


def official_grid_and_noise(io):
    """The official run's float32 time grid (as diffusion time) and Brownian increments."""
    ta, tb = io["pur_step_ta"], io["pur_step_tb"]
    ts = np.concatenate([np.float32(1) - ta, [np.float32(1) - tb[-1]]]).astype(np.float32)
    z = io["pur_z_int8"].astype(np.float32) / 32
    n, b = z.shape[:2]
    inc = (io["pur_step_sqrt_dt"][:, None, None] * z).reshape(n, b, 3, 32, 32)
    return jnp.asarray(ts), jnp.asarray(inc.transpose(0, 1, 3, 4, 2))


def test_purification_with_stored_noise(small_score, score_io):
    """100 Euler steps on the official float32 grid with the stored noise: <= 1e-4."""
    sde, t_star = small_score.sde, float(score_io["pur_t_int"]) / 1000
    x_init = sde.diffuse(nhwc(score_io["pur_x0"]), nhwc(score_io["pur_eps"]), t_star)
    assert max_rel_err(to_nchw(x_init), score_io["pur_x_init"]) <= TOL
    ts, increments = official_grid_and_noise(score_io)
    config = PurifyConfig(t_star=t_star)
    assert len(ts) == config.n_steps + 1
    # Our own grid is the same grid up to float32 accumulation in the official solver.
    np.testing.assert_allclose(config.time_grid(), ts, atol=2e-6)
    solve = jax.jit(
        lambda v, x: reverse_solve(
            sde, small_score.score_fn, config, v, x, ts, StoredBrownianPath(ts, increments)
        )
    )
    out = to_nchw(solve(small_score.variables, x_init))
    assert np.abs(out - score_io["pur_x_out"]).max() <= 1e-4


def test_full_size_keys_match_official_checkpoint(reference_dir):
    full = json.loads((reference_dir / "score_sde_cifar10_full_keys.json").read_text())
    official = {k: tuple(s) for k, s, _ in full["state_dict"] if k != "sigmas"}
    assert expected_torch_keys() == official
    # The EMA list is named in exactly this parameter order.
    assert list(official) == [name for name, _ in full["ema_shadow_params_order"]]


def _small_ckpt(reference_dir):
    return torch.load(reference_dir / "score_sde_cifar10_small.pth", weights_only=True)


def test_ema_list_must_align(reference_dir):
    ckpt = _small_ckpt(reference_dir)
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    with pytest.raises(ConversionError, match="cannot be named"):
        score_sde_state_dict(ckpt)
    ckpt = _small_ckpt(reference_dir)
    sp = ckpt["ema"]["shadow_params"]
    sp[0], sp[2] = sp[2], sp[0]
    with pytest.raises(ConversionError, match="order does not match"):
        score_sde_state_dict(ckpt)


def test_wrong_architecture_names_keys(reference_dir, tmp_path):
    with pytest.raises(ConversionError) as err:
        convert_score_sde(str(reference_dir / "score_sde_cifar10_small.pth"), str(tmp_path / "o"))
    message = str(err.value)
    assert "missing keys" in message and "misshaped keys" in message
    assert "all_modules.0.weight: expected (512, 128), got (64, 16)" in message
    assert not (tmp_path / "o" / "config.json").exists()


def test_not_a_score_sde_checkpoint(reference_dir, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ConversionError, match="expected a dict with 'model' and 'ema'"):
        convert_score_sde(str(path), str(tmp_path / "o"))
