"""DiffPure's ImageNet purification path against the official outputs (guided_imagenet256_*):
the integer timestep, the score of the learned-sigma ADM, the reverse SDE, the whole 150-step
purification with the stored noise, and the bilinear resizes around it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_score, max_rel_err, nhwc

from diffpure_jax import PurifyConfig, load_score_model, purify
from diffpure_jax.convert.guided_diffusion import convert_guided_diffusion
from diffpure_jax.noise import StoredBrownianPath, example_keys
from diffpure_jax.purify import purify_with_keys, reverse_solve
from diffpure_jax.resize import resize_bilinear
from diffpure_jax.score import guided_diffusion_timesteps
from diffpure_jax.sde import VPSDE

TOL = 1e-5


def to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def io(reference_dir):
    return np.load(reference_dir / "guided_imagenet256_small_io.npz")


@pytest.fixture(scope="module")
def adm(reference_dir, tmp_path_factory):
    """The small reference ADM (64 x 64, 32 channels), converted from its .pth."""
    out = str(tmp_path_factory.mktemp("adm") / "adm-small")
    convert_guided_diffusion(
        str(reference_dir / "guided_imagenet256_small.pth"),
        out,
        infer=True,
        image_size=64,
        num_head_channels=16,
    )
    return load_score_model(out)


def test_integer_timesteps_as_the_official_code(io):
    # 1 - 0.85 in float32 is 0.14999998: the official floor gives 149.
    steps = guided_diffusion_timesteps(jnp.asarray(io["sde_rev_t"]))
    np.testing.assert_array_equal(np.asarray(steps), io["sde_disc_steps"])
    assert int(guided_diffusion_timesteps(np.float32(1) - np.float32(0.85))) == 149


def test_continuous_std_and_schedule(io):
    sde = VPSDE()
    t = jnp.asarray(io["sde_rev_t"])
    assert max_rel_err(-1.0 / sde.std(t), io["sde_neg_recip_std"]) <= TOL
    assert max_rel_err(sde.discrete_alphas_cumprod(), io["alphas_cumprod"]) <= TOL
    t_star = float(io["fwd_t_int"]) / 1000
    assert t_star == 0.15
    xt = sde.diffuse(nhwc(io["fwd_x0"]), nhwc(io["fwd_eps"]), t_star)
    assert max_rel_err(to_nchw(xt), io["fwd_xt"]) <= TOL


def test_eps_and_score(adm, io):
    x = nhwc(io["x"])
    t = jnp.asarray(io["sde_rev_t"][0])
    score = jax.jit(adm.__call__)(x, t)
    assert max_rel_err(to_nchw(score), io["sde_score_at_s0"]) <= TOL
    eps = -score * adm.sde.std(t)[:, None, None, None]
    assert max_rel_err(to_nchw(eps), io["sde_eps_at_s0"]) <= TOL


def test_reverse_drift_and_diffusion(adm, io):
    x = nhwc(io["x"])
    score = jax.jit(adm.__call__)
    for i in range(len(io["sde_s"])):
        t = jnp.asarray(io["sde_rev_t"][i])
        f = -adm.sde.reverse_drift(score(x, t), x, t[:, None, None, None])
        assert max_rel_err(to_nchw(f), io["sde_f"][i]) <= TOL
        assert max_rel_err(adm.sde.diffusion(t), io["sde_g"][i]) <= TOL


def test_150_step_purification_with_stored_noise(adm, io):
    """The official image_editing_sample, t = 150, on its float32 grid with its noise."""
    t_star = float(io["pur_t_int"]) / 1000
    x_init = adm.sde.diffuse(nhwc(io["pur_x0"]), nhwc(io["pur_eps"]), t_star)
    assert max_rel_err(to_nchw(x_init), io["pur_x_init"]) <= TOL
    ta, tb = io["pur_step_ta"], io["pur_step_tb"]
    ts = np.concatenate([np.float32(1) - ta, [np.float32(1) - tb[-1]]]).astype(np.float32)
    z = io["pur_z_int8"].astype(np.float32) / 32
    inc = (io["pur_step_sqrt_dt"][:, None, None] * z).reshape(len(z), 1, 3, 64, 64)
    config = PurifyConfig(t_star=t_star)
    assert config.n_steps == len(ta) == 150
    np.testing.assert_allclose(config.time_grid(), ts, atol=3e-6)
    ts, path = jnp.asarray(ts), StoredBrownianPath(jnp.asarray(ts), inc.transpose(0, 1, 3, 4, 2))
    solve = jax.jit(lambda v, x: reverse_solve(adm.sde, adm.score_fn, config, v, x, ts, path))
    out = to_nchw(solve(adm.variables, x_init))
    assert np.abs(out - io["pur_x_out"]).max() <= 1e-4
    # On our own grid (t* - k dt in float64, then float32) the integer timesteps are the
    # official ones at 148 of the 150 steps: the official float32 solver time starts at
    # 1 - 0.85 = 0.14999998, so its first step is 149 where ours is 150.
    ours = np.asarray(guided_diffusion_timesteps(config.time_grid()[:-1]))
    official = np.asarray(guided_diffusion_timesteps(np.float32(1) - ta))
    assert (ours[0], official[0]) == (150, 149)
    assert (ours != official).sum() == 2


def test_bilinear_resize_matches_interpolate(io):
    up = resize_bilinear(nhwc(io["resize_in56"]), (64, 64))
    assert np.abs(to_nchw(up) - io["resize_up64"]).max() <= 1e-6
    down = resize_bilinear(nhwc(io["resize_in64"]), (56, 56))
    assert np.abs(to_nchw(down) - io["resize_down56"]).max() <= 1e-6


def test_input_size_resizes_around_the_purifier():
    """input_size 7 around an 8 x 8 score model is resize -> purify -> resize, inside the
    differentiated function; the noise is that of the score model's size."""
    score = gaussian_score((8, 8, 3))
    config = PurifyConfig(t_star=0.01, dt=0.005, input_size=7)
    x = jax.random.uniform(jax.random.key(0), (2, 7, 7, 3), minval=0.1, maxval=0.9)
    key = jax.random.key(1)
    out = purify(score, config, x, key)
    assert out.shape == x.shape
    plain = PurifyConfig(t_star=0.01, dt=0.005)
    keys = example_keys(key, jnp.arange(2))
    manual = resize_bilinear(
        purify_with_keys(score, plain, resize_bilinear(x, (8, 8)), keys), (7, 7)
    )
    np.testing.assert_allclose(out, manual, atol=1e-6)
    grad = jax.grad(lambda x: purify(score, config, x, key).sum())(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    with pytest.raises(ValueError, match=r"\(B, 7, 7, 3\)"):
        purify(score, config, jnp.zeros((1, 8, 8, 3)) + 0.5, key)
