"""Purifier behaviour: configuration and input errors, noise replay, EOT batching, paths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_score

from diffpure_jax import (
    Classifier,
    DefendedClassifier,
    Purifier,
    PurifyConfig,
    noise,
    purify,
    purify_eot,
)
from diffpure_jax.attacks.base import eot_keys
from diffpure_jax.models.ncsnpp import tiny_score_model
from diffpure_jax.purify import purify_with_keys

CFG = PurifyConfig(t_star=0.05, dt=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(t_star=0.0), "t_star must be in"),
        (dict(t_star=1.5), "t_star must be in"),
        (dict(t_star=0.1, dt=0.003), "does not divide"),
        (dict(dt=-1e-3), "dt must be in"),
        (dict(t_end=0.01), "t_end must be in"),
        (dict(grad="fast"), "grad must be one of"),
        (dict(solver="rk4"), "solver must be one of"),
        (dict(brownian="pink"), "brownian must be one of"),
        (dict(grad="adjoint", solver="euler_heun"), "grad='adjoint' supports"),
        (dict(unroll=True, solver="heun"), "unroll=True supports solver 'euler' only"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PurifyConfig(**kwargs)


def test_time_grid_is_papers():
    ts = PurifyConfig().time_grid()
    assert len(ts) == 101 and ts[0] == np.float32(0.1) and ts[-1] == np.float32(1e-5)
    np.testing.assert_allclose(np.diff(ts[:-1]), -1e-3, rtol=1e-4)


def test_bad_images():
    score = gaussian_score()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="NHWC"):
        purify(score, CFG, jnp.zeros((2, 3, 4, 4)), key)  # NCHW
    with pytest.raises(ValueError, match="NHWC"):
        purify(score, CFG, jnp.zeros((4, 4, 3)), key)  # no batch axis
    with pytest.raises(ValueError, match="floating point"):
        purify(score, CFG, jnp.zeros((2, 4, 4, 3), jnp.uint8), key)
    with pytest.raises(Exception, match=r"in \[0, 1\]"):
        purify(score, CFG, jnp.full((2, 4, 4, 3), 255.0), key)
    with pytest.raises(Exception, match=r"in \[0, 1\]"):  # also inside jit
        jax.jit(lambda x: purify(score, CFG, x, key))(jnp.full((2, 4, 4, 3), -0.5))


def test_noise_is_independent_of_batch_composition():
    score = gaussian_score()
    x = jax.random.uniform(jax.random.key(1), (5, 4, 4, 3))
    key = jax.random.key(7)
    full = purify(score, CFG, x, key, index=jnp.arange(10, 15))
    sub = purify(score, CFG, x[jnp.array([3, 1])], key, index=jnp.array([13, 11]))
    np.testing.assert_allclose(sub, full[jnp.array([3, 1])], rtol=1e-6, atol=1e-6)
    # Different indices or keys (another EOT draw) give different noise.
    other = purify(score, CFG, x, key, index=jnp.arange(5))
    assert float(jnp.abs(other - full).max()) > 1e-2
    redraw = purify(score, CFG, x, eot_keys(key, 2)[1], index=jnp.arange(10, 15))
    assert float(jnp.abs(redraw - full).max()) > 1e-2


def test_eot_draws_equal_single_draws():
    score = gaussian_score()
    x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 3))
    key = jax.random.key(2)
    eot = purify_eot(score, CFG, x, key, 3, index=jnp.array([4, 5, 6]))
    assert eot.shape == (3, 3, 4, 4, 3)
    for d in range(3):
        single = purify(score, CFG, x, eot_keys(key, 3)[d], index=jnp.array([4, 5, 6]))
        np.testing.assert_allclose(eot[d], single, rtol=1e-6, atol=1e-6)


def test_tree_path_replays_and_matches_grid_statistics():
    score = gaussian_score()
    x = jnp.full((64, 4, 4, 3), 0.5)
    key = jax.random.key(3)
    tree = dataclasses.replace(CFG, brownian="tree")
    a, b = purify(score, tree, x, key), purify(score, tree, x, key)
    np.testing.assert_array_equal(a, b)
    grid = purify(score, CFG, x, key)
    # Same law, different samples: the spread over examples agrees within sampling error.
    assert float(jnp.abs(a - grid).max()) > 1e-3
    np.testing.assert_allclose(jnp.std(a), jnp.std(grid), rtol=0.15)
    np.testing.assert_allclose(jnp.mean(a), jnp.mean(grid), atol=0.02)


def test_probability_flow_is_deterministic_given_forward_noise():
    score = gaussian_score()
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    ode = dataclasses.replace(CFG, probability_flow=True)
    a = purify(score, ode, x, jax.random.key(0))
    sde = purify(score, CFG, x, jax.random.key(0))
    assert float(jnp.abs(a - sde).max()) > 1e-3  # the SDE adds Brownian noise on top


def test_reverse_keys_redraw_only_the_reverse_noise():
    score = gaussian_score()
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    keys = noise.example_keys(jax.random.key(0), jnp.arange(2))
    other = noise.example_keys(jax.random.key(0), jnp.arange(2), 1)
    base = purify(score, CFG, x, jax.random.key(0))
    np.testing.assert_array_equal(purify_with_keys(score, CFG, x, keys, keys), base)
    redrawn = purify_with_keys(score, CFG, x, keys, other)
    assert float(jnp.abs(redrawn - base).max()) > 1e-3
    # The forward diffusion is the same: without reverse noise (the probability-flow ODE) the
    # result does not depend on the reverse keys.
    ode = dataclasses.replace(CFG, probability_flow=True)
    np.testing.assert_array_equal(
        purify_with_keys(score, ode, x, keys, other), purify(score, ode, x, jax.random.key(0))
    )


def test_defended_classifier_modes():
    score = gaussian_score()
    weights = jax.random.normal(jax.random.key(5), (4 * 4 * 3, 3))
    classifier = Classifier(weights, lambda w, x: x.reshape(x.shape[0], -1) @ w, (4, 4, 3))
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3))
    key = jax.random.key(2)
    defended = DefendedClassifier(Purifier(score, CFG), classifier)
    logits = defended(x, key)
    np.testing.assert_allclose(
        logits, classifier(purify(score, CFG, x, key), check=False), rtol=1e-6
    )
    eot = defended.eot(x, key, 2)
    np.testing.assert_allclose(eot[1], defended(x, eot_keys(key, 2)[1]), rtol=1e-5, atol=1e-6)

    def loss(model, x):
        return jnp.sum(model(x, key)[:, 0])

    blind = defended.replace(grad="blind")
    np.testing.assert_allclose(blind(x, key), logits, rtol=1e-6)
    g_blind = jax.grad(loss, argnums=1)(blind, x)
    g_clf = jax.grad(lambda x: jnp.sum(classifier(x)[:, 0]))(x)
    np.testing.assert_allclose(g_blind, g_clf, rtol=1e-6)
    g_bpda = jax.grad(loss, argnums=1)(defended.replace(grad="bpda"), x)
    np.testing.assert_allclose(g_bpda, g_clf, rtol=1e-6)  # linear classifier: same gradient
    g_exact = jax.grad(loss, argnums=1)(defended, x)
    assert float(jnp.abs(g_exact - g_clf).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "grad, probability_flow", [("exact", False), ("adjoint", False), ("exact", True)]
)
def test_unrolled_solve_equals_the_loop(grad, probability_flow):
    """unroll=True changes how the steps are compiled, not the values or the gradients."""
    score = tiny_score_model()
    config = PurifyConfig(t_star=0.04, dt=0.01, grad=grad, probability_flow=probability_flow)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(3), x.shape)
    key = jax.random.key(0)

    def run(cfg):
        @jax.jit  # eagerly, the vjp compiles hundreds of small programs
        def out_and_grad(x):
            out, vjp = jax.vjp(lambda x: purify(score, cfg, x, key), x)
            return out, vjp(w)[0]

        return out_and_grad(x)

    out, grad_loop = run(config)
    out_unrolled, grad_unrolled = run(dataclasses.replace(config, unroll=True))
    np.testing.assert_allclose(out_unrolled, out, rtol=0, atol=2e-6)
    rel = float(jnp.linalg.norm(grad_unrolled - grad_loop) / jnp.linalg.norm(grad_loop))
    assert rel < 1e-5
