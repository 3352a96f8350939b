"""PGD(-EOT) (diffpure_jax.attacks.pgd) on small trained models: stopping at the first success,
or taking every step and being judged at the last iterate (`stop_at_success=False`); BPDA+EOT
(`bpda_eot`, `suites.bpda_eot_suite`) as PGD with DiffPure's settings."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import NoisyModel, synthetic_data, trained_mlp  # noqa: E402

from diffpure_jax.attacks.base import Threat, in_threat, project  # noqa: E402
from diffpure_jax.attacks.losses import cross_entropy  # noqa: E402
from diffpure_jax.attacks.pgd import bpda_eot, pgd  # noqa: E402
from diffpure_jax.attacks.suites import bpda_eot_suite, pgd_suite  # noqa: E402

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def setup():
    x, y = synthetic_data(32, seed=5)
    return trained_mlp(), x, y


def _misclassified(model, x, y):
    return np.asarray(jnp.argmax(model(x, None), -1) != y)


def _reference_final_iterate(model, x, y, threat, n_iter, step):
    """Plain sign-gradient ascent on the cross-entropy, no random start, every step."""
    grad = jax.grad(lambda v: jnp.sum(cross_entropy(model(v, None), y)))
    v = x
    for _ in range(n_iter):
        v = project(v + step * jnp.sign(grad(v)), x, threat)
    return v


@pytest.mark.parametrize("stop", [True, False])
def test_fooled_is_the_misclassification_at_x_adv(setup, stop):
    model, x, y = setup
    threat = Threat("Linf", 0.12)
    res = pgd(model, x, y, KEY, threat=threat, n_iter=10, n_eot=1, stop_at_success=stop)
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    fooled = np.asarray(res.fooled)
    np.testing.assert_array_equal(fooled, _misclassified(model, res.x_adv, y))
    assert 0 < fooled.sum() < len(y)  # the eps is chosen so that the attack breaks some, not all


def test_final_iterate_takes_every_step(setup):
    model, x, y = setup
    threat = Threat("Linf", 0.12)
    n_iter, step = 6, 0.12 / 4
    res = pgd(
        model, x, y, KEY, threat=threat, n_iter=n_iter, n_eot=1, random_start=False,
        stop_at_success=False,
    )  # fmt: skip
    expected = _reference_final_iterate(model, x, y, threat, n_iter, step)
    np.testing.assert_allclose(res.x_adv, expected, atol=1e-6)


def test_stopping_keeps_the_first_broken_point(setup):
    model, x, y = setup
    threat = Threat("Linf", 0.12)
    stop = pgd(model, x, y, KEY, threat=threat, n_iter=10, n_eot=1, random_start=False)
    final = pgd(
        model, x, y, KEY, threat=threat, n_iter=10, n_eot=1, random_start=False,
        stop_at_success=False,
    )  # fmt: skip
    # Examples never broken by the stopping run follow the same path: the same last iterate.
    never = ~np.asarray(stop.fooled)
    np.testing.assert_allclose(np.asarray(stop.x_adv)[never], np.asarray(final.x_adv)[never])
    # A deterministic model: what the stopping run broke, the full run's iterates passed through
    # too, and the final iterate moved further (at least as far from x in Linf).
    broke = np.asarray(stop.fooled)
    dist = lambda v: np.abs(np.asarray(v) - np.asarray(x)).reshape(len(y), -1).max(1)  # noqa: E731
    assert (dist(final.x_adv)[broke] >= dist(stop.x_adv)[broke] - 1e-6).all()


def test_inactive_examples_are_unchanged(setup):
    model, x, y = setup
    active = jnp.arange(len(y)) % 2 == 0
    res = pgd(
        model, x, y, KEY, threat=Threat("Linf", 0.12), n_iter=4, n_eot=1, active=active,
        stop_at_success=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(res.x_adv)[1::2], np.asarray(x)[1::2])
    assert not np.asarray(res.fooled)[1::2].any()


# --- BPDA+EOT: DiffPure's settings of pgd -------------------------------------------------------

DIFFPURE_BPDA = dict(
    n_iter=50, step_size=2 / 255, n_eot=15, average="logits", random_start=False,
    recheck_draws=150,
)  # fmt: skip


def _assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.x_adv), np.asarray(b.x_adv))
    np.testing.assert_array_equal(np.asarray(a.fooled), np.asarray(b.fooled))


def test_bpda_eot_is_pgd_with_diffpure_settings(setup):
    _, x, y = setup
    model = NoisyModel(trained_mlp(), scale=1.0)  # random: n_eot, average, recheck all matter
    threat = Threat("Linf", 8 / 255)
    got = bpda_eot(model, x, y, KEY, threat=threat)
    _assert_same(got, pgd(model, x, y, KEY, threat=threat, **DIFFPURE_BPDA))
    # No random start, steps of 2/255: every coordinate the box did not clip moved by a whole
    # number of steps (at most eps = 4 steps), and the attack moved some points.
    delta = np.asarray(got.x_adv) - np.asarray(x)
    unclipped = (np.asarray(got.x_adv) > 0) & (np.asarray(got.x_adv) < 1)
    steps = delta[unclipped] / (2 / 255)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(steps).max() <= 4 + 1e-3 and np.abs(delta).max() > 0


def test_bpda_eot_overrides_pass_through(setup):
    _, x, y = setup
    model = NoisyModel(trained_mlp(), scale=1.0)
    threat = Threat("Linf", 0.06)
    small = dict(n_iter=3, n_eot=2)
    got = bpda_eot(model, x, y, KEY, threat=threat, **small)
    _assert_same(got, pgd(model, x, y, KEY, threat=threat, **{**DIFFPURE_BPDA, **small}))
    # The suite runs bpda_eot as pgd_suite runs pgd with the same settings.
    suite = bpda_eot_suite(threat, **small)(model, x, y, KEY)
    same = pgd_suite(threat, "bpda-eot", **{**DIFFPURE_BPDA, **small})(model, x, y, KEY)
    assert set(suite.attack_preds) == {"bpda-eot"}
    for a, b in zip(jax.tree_util.tree_leaves(suite), jax.tree_util.tree_leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
