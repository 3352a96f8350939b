"""The reverse trajectory (`Purifier.trajectory`, `DDPMPurifier.trajectory`): the states of the
one reverse solve at chosen steps, with the same values and gradient modes as `purify`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_score

from diffpure_jax import Purifier, PurifyConfig, noise
from diffpure_jax.ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule
from diffpure_jax.purify import make_path

CFG = PurifyConfig(t_star=0.05, dt=0.01, forward_schedule="continuous")
STEPS = (0, 2, 4, 5)
TOL = dict(rtol=1e-5, atol=1e-6)


def _data(shape=(4, 4, 3)):
    x = jax.random.uniform(jax.random.key(1), (2, *shape), minval=0.1, maxval=0.9)
    w = jax.random.normal(jax.random.key(2), (len(STEPS), 2, *shape))
    return x, w, jax.random.key(3)


def _by_hand(score, config, x, key):
    """Euler-Maruyama step by step in Python: every state, (n + 1, B, ...)."""
    keys = noise.example_keys(key, jnp.arange(x.shape[0]))
    y = score.sde.diffuse(
        2 * x - 1, noise.forward_noise(keys, x.shape[1:]), config.t_star, "continuous"
    )
    ts = jnp.asarray(config.time_grid())
    path = make_path(config, keys, x.shape[1:], ts=ts)
    states = [y]
    for k in range(config.n_steps):
        t0, t1 = ts[k], ts[k + 1]
        drift = score.sde.reverse_drift(score.score_fn(score.variables, y, t0), y, t0)
        y = y + drift * (t1 - t0) + score.sde.diffusion(t0) * path.evaluate(t0, t1)
        states.append(y)
    return jnp.stack(states)


@pytest.mark.parametrize("unroll", [False, True])
def test_states_are_the_solve_states_and_purified_is_purify(unroll):
    score = gaussian_score()
    config = dataclasses.replace(CFG, unroll=unroll)
    purifier = Purifier(score, config)
    x, _, key = _data()
    traj = jax.jit(lambda p, x: p.trajectory(x, key, STEPS))(purifier, x)
    np.testing.assert_allclose(traj.purified, purifier(x, key), **TOL)
    np.testing.assert_allclose(
        traj.reverse, _by_hand(score, config, x, key)[np.array(STEPS)], **TOL
    )
    np.testing.assert_array_equal(traj.steps, STEPS)
    np.testing.assert_allclose(traj.times, config.time_grid()[np.array(STEPS)])
    np.testing.assert_allclose((traj.reverse[-1] + 1) / 2, traj.purified, **TOL)
    # diffused: the forward diffusion to each step's time with the purification's own noise.
    eps = noise.forward_noise(noise.example_keys(key, jnp.arange(2)), x.shape[1:])
    abar = np.exp(score.sde.log_alpha_bar(np.float64(traj.times)))[:, None, None, None, None]
    np.testing.assert_allclose(
        traj.diffused, np.sqrt(abar) * (2 * x - 1) + np.sqrt(1 - abar) * eps, **TOL
    )
    np.testing.assert_allclose(traj.diffused[0], traj.reverse[0], **TOL)  # continuous: x_t*


def _state_grad(purifier, x, w, key):
    def loss(x):
        t = purifier.trajectory(x, key, STEPS)
        return jnp.sum(w * t.reverse) + jnp.sum(t.purified)

    return jax.jit(jax.grad(loss))(x)


def test_state_gradients_exact_match_step_by_step_and_adjoint_is_close():
    score = gaussian_score()
    x, w, key = _data()

    def by_hand(x):
        states = _by_hand(score, CFG, x, key)
        return jnp.sum(w * states[np.array(STEPS)]) + jnp.sum((states[-1] + 1) / 2)

    want = jax.grad(by_hand)(x)
    exact = _state_grad(Purifier(score, CFG), x, w, key)
    np.testing.assert_allclose(exact, want, **TOL)
    unrolled = _state_grad(Purifier(score, dataclasses.replace(CFG, unroll=True)), x, w, key)
    np.testing.assert_allclose(unrolled, want, **TOL)
    # The continuous adjoint is first order in dt away from exact, here too.
    adjoint = _state_grad(Purifier(score, dataclasses.replace(CFG, grad="adjoint")), x, w, key)
    gap = float(jnp.linalg.norm(adjoint - want) / jnp.linalg.norm(want))
    assert 1e-6 < gap < 5e-2, gap


def test_adjoint_takes_every_state_cotangent():
    """A cotangent on the state at step k enters the adjoint at step k: for each state alone,
    adjoint and exact agree to first order in dt."""
    score = gaussian_score()
    x, _, key = _data()
    fine = dataclasses.replace(CFG, dt=2e-3, t_end=0.0)
    steps = (0, 5, 12, 25)

    def loss(x, p, w):
        return jnp.sum(w * p.trajectory(x, key, steps).reverse)

    grad = jax.jit(jax.grad(loss))
    for k in range(len(steps)):
        w = jnp.zeros((len(steps), *x.shape)).at[k].set(1.0)
        exact, adjoint = (
            grad(x, Purifier(score, dataclasses.replace(fine, grad=m)), w)
            for m in ("exact", "adjoint")
        )
        gap = float(jnp.linalg.norm(adjoint - exact) / jnp.linalg.norm(exact))
        assert gap < 2e-2, (steps[k], gap)


def test_bpda_and_blind_states_carry_no_gradient():
    score = gaussian_score()
    x, w, key = _data()
    times = jnp.asarray(CFG.time_grid()[np.array(STEPS)])
    closed_form = 2 * jnp.sum(jnp.sqrt(score.sde.alpha_bar(times)))  # d sum(diffused) / dx
    for mode in ("bpda", "blind"):
        p = Purifier(score, dataclasses.replace(CFG, grad=mode))

        def loss(x, p=p):
            t = p.trajectory(x, key, STEPS)
            return jnp.sum(w * t.reverse) + jnp.sum(t.diffused)

        expect = 0.0 if mode == "blind" else closed_form
        np.testing.assert_allclose(
            jax.grad(loss)(x), jnp.broadcast_to(expect, x.shape), rtol=1e-5, atol=1e-7
        )


def test_bad_steps_are_refused():
    p = Purifier(gaussian_score(), CFG)
    x, _, key = _data()
    for steps in ((2, 1), (0, 6), (-1,), (3, 3)):
        with pytest.raises(ValueError, match="strictly increasing step indices in \\[0, 5\\]"):
            p.trajectory(x, key, steps)


def _tiny_ddpm(grad="exact"):
    def eps_fn(v, x, t):
        return v["a"] * jnp.tanh(x) + v["b"] * (t[:, None, None, None] / 1000.0)

    schedule = DDPMSchedule(num_timesteps=20)
    variables = {"a": jnp.asarray(0.3), "b": jnp.asarray(0.2)}
    config = DDPMConfig(t_star=0.25, grad=grad)
    return DDPMPurifier(variables, eps_fn, schedule, (4, 4, 3), config)


def test_ddpm_trajectory_states_and_gradients():
    p = _tiny_ddpm()
    assert p.n_steps == 5
    x, w, key = _data()
    traj = p.trajectory(x, key, STEPS)
    np.testing.assert_allclose(traj.purified, p(x, key), **TOL)
    # By hand: the chain one step at a time.
    keys = noise.example_keys(key, jnp.arange(2))
    eps = noise.forward_noise(keys, (4, 4, 3))
    y = p.schedule.diffuse(2 * x - 1, eps, 5)
    states = [y]
    for i in range(4, -1, -1):
        y = p.schedule.step(
            lambda z, t: p.eps_fn(p.variables, z, t), y, i, noise.step_noise(keys, i, (4, 4, 3))
        )
        states.append(y)
    np.testing.assert_allclose(traj.reverse, jnp.stack(states)[np.array(STEPS)], **TOL)
    abar = np.append(p.schedule.alphas_cumprod, 1.0)[[4, 2, 0, -1]]
    np.testing.assert_allclose(traj.times, [0.25, 0.15, 0.05, 0.0], rtol=1e-6)
    np.testing.assert_allclose(traj.diffused[0], states[0], **TOL)
    np.testing.assert_allclose(
        traj.diffused[2], np.sqrt(abar[2]) * (2 * x - 1) + np.sqrt(1 - abar[2]) * eps, **TOL
    )
    np.testing.assert_allclose(traj.diffused[3], 2 * x - 1, **TOL)
    g = jax.grad(lambda x: jnp.sum(w * p.trajectory(x, key, STEPS).reverse))(x)
    h = 1e-2
    d = jax.random.normal(jax.random.key(7), x.shape)

    def f(x):
        return jnp.sum(w * p.trajectory(x, key, STEPS).reverse)

    fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=2e-3)
