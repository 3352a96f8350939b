"""DDPM purification (DiffPure's CelebA-HQ path): parity with the official code, gradients, noise.

Parity (reference ddpm_celebahq256_small_*, the small 64x64 model converted from its .pth):
schedule, forward diffusion at t = 500, single ancestral steps at t = 0, 1, 250, 499 and the
official `image_editing_sample` with t = 10, with the reference noise replayed (max abs error
<= 1e-5). Gradients on a tiny random DDPMUNet (8x8): `exact` against central finite differences
in float64, checkpointed equal to uncheckpointed, bpda and blind as defined.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import nhwc

from diffpure_jax import Classifier, DefendedClassifier, PurifyConfig
from diffpure_jax.attacks.base import eot_keys
from diffpure_jax.checkpoint import CheckpointError
from diffpure_jax.convert.ddpm import convert_ddpm
from diffpure_jax.ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule, stored_step_noise
from diffpure_jax.load import load_purifier, load_score_model
from diffpure_jax.models.ddpm_unet import DDPMUNet

TOL = 1e-5
ADJOINT = "grad='adjoint' is the continuous adjoint of the VP-SDE; the DDPM chain is discrete"


@pytest.fixture(scope="module")
def io(reference_dir):
    return np.load(reference_dir / "ddpm_celebahq256_small_io.npz")


@pytest.fixture(scope="module")
def small_dir(reference_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddpm") / "small")
    convert_ddpm(str(reference_dir / "ddpm_celebahq256_small.pth"), out, infer=True, image_size=64)
    return out


@pytest.fixture(scope="module")
def small(small_dir):
    """The converted small model as a DDPMPurifier with t = 10 (the reference chain's)."""
    return load_purifier(small_dir, t_star=0.01)


def max_abs(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def test_schedule_parity(io):
    s = DDPMSchedule()
    assert s.betas.dtype == np.float32 and s.alphas_cumprod.dtype == np.float32
    errs = {
        "betas": max_abs(s.betas, io["betas"]),
        "alphas_cumprod": max_abs(s.alphas_cumprod, io["alphas_cumprod"]),
        "logvar": max_abs(s.logvar, io["logvar_fixedsmall"]),
    }
    print(f"DDPM schedule vs official: max abs err {errs}")
    assert errs == {"betas": 0.0, "alphas_cumprod": 0.0, "logvar": 0.0}


def test_forward_diffusion_parity(io):
    assert int(io["fwd_t_int"]) == 500
    xt = DDPMSchedule().diffuse(nhwc(io["fwd_x0"]), nhwc(io["fwd_eps"]), 500)
    err = max_abs(xt, nhwc(io["fwd_xt"]))
    print(f"DDPM forward diffusion at t=500 vs official: max abs err {err:.3g}")
    assert err <= TOL


def test_single_steps_parity(small, io):
    t = jnp.asarray(io["step_t"])
    assert io["step_t"].tolist() == [0, 1, 250, 499]

    def eps_fn(x, t):
        return small.eps_fn(small.variables, x, t)

    @jax.jit
    def run(x, z):
        return eps_fn(x, t), small.schedule.step(eps_fn, x, t, z)

    x, z = nhwc(io["step_x"]), nhwc(io["step_noise"])
    eps, sample = run(x, z)
    _, mean = run(x, jnp.zeros_like(z))
    errs = {
        "model_out": max_abs(eps, nhwc(io["step_model_out"])),
        "mean": max_abs(mean, nhwc(io["step_mean"])),
        "sample": [max_abs(sample[i], nhwc(io["step_sample"])[i]) for i in range(4)],
    }
    print(f"DDPM single steps at t={io['step_t'].tolist()} vs official: max abs err {errs}")
    assert max(errs["model_out"], errs["mean"], *errs["sample"]) <= TOL
    np.testing.assert_array_equal(sample[0], mean[0])  # no noise at t = 0


def test_chain_parity(small, io):
    """DiffPure's image_editing_sample with t = 10, its noise replayed, through the purifier."""
    assert int(io["chain_t_int"]) == 10 and small.n_steps == 10
    assert io["chain_step_t"].tolist() == list(range(9, -1, -1))
    x = (nhwc(io["chain_x0"]) + 1.0) / 2.0  # the purifier takes [0, 1]
    z = jnp.asarray(io["chain_step_noise"]).transpose(0, 1, 3, 4, 2)  # (10, 1, H, W, C)
    out = jax.jit(lambda p, x, e, z: p.purify_with_noise(x, e, stored_step_noise(z)))(
        small, x, nhwc(io["chain_eps"]), z
    )
    err = max_abs(2.0 * out - 1.0, nhwc(io["chain_x_out"]))
    print(f"DDPM 10-step chain vs official image_editing_sample: max abs err {err:.3g}")
    assert err <= TOL


def test_load(small_dir, small):
    assert isinstance(small, DDPMPurifier) and small.config == DDPMConfig(t_star=0.01)
    assert small.schedule == DDPMSchedule() and small.image_shape == (64, 64, 3)
    assert load_purifier(small_dir).config == DDPMConfig()  # t = 500
    cli = load_purifier(small_dir, PurifyConfig(t_star=0.5, grad="bpda", checkpoints=7))
    assert cli.config == DDPMConfig(t_star=0.5, grad="bpda", checkpoints=7)
    assert load_purifier(small_dir, DDPMConfig(), grad="blind").config.grad == "blind"
    with pytest.raises(ValueError, match="dt = 1/1000"):
        load_purifier(small_dir, t_star=0.5, dt=0.01)
    with pytest.raises(ValueError, match="solver do not apply"):
        load_purifier(small_dir, PurifyConfig(t_star=0.5, solver="heun"))
    with pytest.raises(ValueError, match="whole number of DDPM steps"):
        load_purifier(small_dir, t_star=0.0005)
    with pytest.raises(CheckpointError, match="load_purifier"):
        load_score_model(small_dir)


# --------------------------------------------------------------------------------------------
# gradients: a tiny random DDPMUNet (8 x 8) in float64; the interface: a cheap analytic eps


@dataclasses.dataclass(frozen=True)
class Amplified:
    """The network's eps times `scale`, so that it matters in a 3-step chain near t = 0
    (beta_i / sqrt(1 - abar_i) is about 0.01 there)."""

    apply: Callable
    scale: float = 1.0

    def __call__(self, variables, x, t):
        return self.scale * self.apply(variables, x, t)


def analytic_eps(params, x, t):
    """A smooth stand-in for the network (compiles in a fraction of a second): mixes
    neighbouring pixels and depends on t."""
    s = jnp.sin(t.astype(x.dtype) / 50.0)[:, None, None, None]
    return jnp.tanh(params["a"] * x + params["c"] * jnp.roll(x, 1, axis=1)) * (1 + params["b"] * s)


def purifier(**config) -> DDPMPurifier:
    params = {"a": jnp.asarray(30.3), "b": jnp.asarray(0.51), "c": jnp.asarray(-20.17)}
    return DDPMPurifier(params, analytic_eps, DDPMSchedule(), (8, 8, 3), DDPMConfig(**config))


def tiny_unet(dtype, **config) -> DDPMPurifier:
    net = DDPMUNet(image_size=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
    eps_fn = Amplified(net.apply, 30.0)
    return DDPMPurifier(variables, eps_fn, DDPMSchedule(), (8, 8, 3), DDPMConfig(**config))


def images(n=2, dtype=jnp.float32, seed=1, side=8):
    return jax.random.uniform(jax.random.key(seed), (n, side, side, 3), dtype, 0.1, 0.9)


def loss(p, x, key, w):
    return jnp.sum(w * p(x, key))


grad = jax.jit(jax.grad(loss, argnums=1))
call = jax.jit(lambda p, x, k, i=None: p(x, k, i))


def rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_exact_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        p = tiny_unet(jnp.float64, t_star=0.003)
        assert p.n_steps == 3
        x = images(dtype=jnp.float64)
        w = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
        key = jax.random.key(3)
        value = jax.jit(loss)
        g = grad(p, x, key, w)
        h, errs = 1e-6, []
        for i in range(3):
            d = jax.random.normal(jax.random.key(10 + i), x.shape, jnp.float64)
            fd = (value(p, x + h * d, key, w) - value(p, x - h * d, key, w)) / (2 * h)
            errs.append(abs(float(jnp.sum(g * d) - fd)) / abs(float(fd)))
        print(f"DDPM exact gradient vs central FD (float64, 3 steps): relative errors {errs}")
        assert max(errs) <= 1e-6
        assert rel(g, w) > 0.1  # the network matters: the gradient is not the identity's


def test_checkpointed_gradient_equals_uncheckpointed():
    """20 steps: the default (all 20 states), equinox's sqrt default 5, and 1 (most recomputing)."""
    with jax.enable_x64(True):
        x, key = images(dtype=jnp.float64), jax.random.key(3)
        w = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
        grads = {c: grad(purifier(t_star=0.02, checkpoints=c), x, key, w) for c in (None, 5, 1)}
        assert rel(grads[5], grads[None]) < 1e-12 and rel(grads[1], grads[None]) < 1e-12
        assert rel(grads[None], w) > 0.1


def test_adjoint_is_refused():
    with pytest.raises(ValueError, match=ADJOINT):
        DDPMConfig(grad="adjoint")
    with pytest.raises(ValueError, match=ADJOINT):
        purifier().replace(grad="adjoint")
    with pytest.raises(ValueError, match=ADJOINT):
        DDPMConfig.from_purify_config(PurifyConfig(t_star=0.5, grad="adjoint"))
    with pytest.raises(ValueError, match="grad must be one of"):
        DDPMConfig(grad="exactly")
    with pytest.raises(TypeError, match="takes a DDPMConfig"):
        dataclasses.replace(purifier(), config=PurifyConfig())


def test_eot_draws_and_noise_follow_key_and_index():
    p = purifier(t_star=0.003)
    x, key = images(3), jax.random.key(4)
    index = jnp.array([5, 6, 7])
    draws = jax.jit(lambda p, x, k, i: p.eot(x, k, 3, i))(p, x, key, index)
    assert draws.shape == (3, *x.shape)
    for d, k in enumerate(eot_keys(key, 3)):
        np.testing.assert_allclose(draws[d], call(p, x, k, index), atol=1e-6)
    assert max_abs(draws[0], draws[1]) > 1e-2  # the draws differ
    # an example's noise follows (key, index), not its position in the batch
    full = call(p, x, key, index)
    np.testing.assert_allclose(call(p, x[1:2], key, index[1:2])[0], full[1], atol=1e-6)
    np.testing.assert_allclose(call(p, x[::-1], key, index[::-1])[2], full[0], atol=1e-6)
    assert max_abs(call(p, x, key, index + 1), full) > 1e-2
    # input size and score dtype
    assert call(p.replace(input_size=6), images(side=6), key).shape == (2, 6, 6, 3)
    bf16 = call(p.replace(score_dtype="bfloat16"), x, key, index)
    assert bf16.dtype == jnp.float32 and 0 < max_abs(bf16, full) < 0.05
    with pytest.raises(ValueError, match="NHWC"):
        p(images(side=6), key)


def test_gradient_modes_and_defended_classifier():
    """bpda: identity backward; blind: none; DefendedClassifier works with each (blind: the
    classifier's gradient at x)."""
    w_cls = jax.random.normal(jax.random.key(7), (8 * 8 * 3, 2)) / 10

    def apply(w, x):
        return jnp.tanh(x.reshape(x.shape[0], -1)) @ w

    classifier = Classifier(w_cls, apply, (8, 8, 3))
    x, key = images(), jax.random.key(5)
    w = jax.random.normal(jax.random.key(2), x.shape)
    v = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    cls_grad = jax.grad(lambda y: jnp.sum(v * classifier(y, check=False)))
    defended_value_and_grad = jax.jit(jax.value_and_grad(lambda x, m: jnp.sum(v * m(x, key))))
    exact = purifier(t_star=0.003)
    purified = call(exact, x, key)
    for mode in ("exact", "bpda", "blind"):
        p = exact.replace(grad=mode)
        if mode != "exact":
            g = grad(p, x, key, w)
            np.testing.assert_array_equal(g, w if mode == "bpda" else jnp.zeros_like(w))
        value, g = defended_value_and_grad(x, DefendedClassifier(p, classifier))
        # the same purified images in every mode
        np.testing.assert_allclose(value, jnp.sum(v * classifier(purified, check=False)),
                                   rtol=1e-6)  # fmt: skip
        want = {
            "exact": lambda: grad(exact, x, key, cls_grad(purified)),  # the chain rule
            "bpda": lambda: cls_grad(purified),
            "blind": lambda: cls_grad(x),
        }[mode]()
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    defended = DefendedClassifier(exact, classifier)
    assert defended.replace(grad="bpda").purifier.config.grad == "bpda"
