"""APGD (diffpure_jax.attacks.apgd) and its losses on small trained models (tests/helpers.py)."""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import synthetic_data, trained_linear, trained_mlp  # noqa: E402

from diffpure_jax.attacks import losses  # noqa: E402
from diffpure_jax.attacks.apgd import (  # noqa: E402
    apgd,
    apgd_targeted,
    checkpoints,
    l1_checkpoint_interval,
    largereps_schedule,
    project_l1_box,
)
from diffpure_jax.attacks.base import Threat, eot_value_and_grad, in_threat  # noqa: E402

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(64, seed=3)


def robust_acc(res):
    return float(1.0 - jnp.mean(res.fooled))


def recheck(model, x_adv, y):
    """Deterministic model: misclassified at x_adv."""
    return np.asarray(jnp.argmax(model(x_adv), axis=1) != y)


def assert_consistent(model, res, x, y, threat, active=None):
    """x_adv inside the threat; for a deterministic model `fooled` is the misclassification at
    x_adv (on active examples); inactive examples unchanged."""
    active = np.ones(len(y), bool) if active is None else np.asarray(active)
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    fooled = np.asarray(res.fooled)
    np.testing.assert_array_equal(fooled, active & recheck(model, res.x_adv, y))
    np.testing.assert_array_equal(np.asarray(res.x_adv)[~active], np.asarray(x)[~active])


# --- schedule -----------------------------------------------------------------------------------


def test_checkpoints_match_reference_rule():
    # By hand from the reference's integers. n_iter = 100: k = 22, then -3 per check down to 6:
    # 22, +19, +16, +13, +10, +7, +6, +6 (= 99; the next, 105, is past the end).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # n_iter = 50: k = int(11.0) = 11, decrement max(int(1.5), 1) = 1, minimum int(3.0) = 3:
    # 11, +10, +9, +8, +7 (= 45; 45 + 6 > 50).
    assert checkpoints(50) == [11, 21, 30, 38, 45]
    # n_iter = 10: k = 2, then 1 (minimum and decrement both clamp to 1).
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert l1_checkpoint_interval(100) == 4
    # L1 use_largereps: ceil(0.3 n), ceil(0.3 n), the rest.
    assert largereps_schedule(100, 1.0) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert largereps_schedule(11, 2.0) == [(6.0, 4), (4.0, 4), (2.0, 3)]


# --- losses -------------------------------------------------------------------------------------


def test_losses_formulas():
    z = jnp.array([[3.0, 1.0, 0.5, -1.0, 2.0], [0.0, 4.0, 1.0, 2.0, -3.0]])
    y = jnp.array([0, 0])
    # sorted: row 0: 3, 2, 1, 0.5; row 1: 4, 2, 1, 0
    np.testing.assert_allclose(losses.margin(z, y), [1.0, -4.0])
    np.testing.assert_allclose(losses.dlr(z, y), [-1.0 / 2.0, 4.0 / 3.0], rtol=1e-6)
    t = jnp.array([4, 3])
    np.testing.assert_allclose(losses.dlr_targeted(z, y, t), [-1.0 / 2.25, 2.0 / 3.5], rtol=1e-6)
    np.testing.assert_allclose(
        losses.cross_entropy(z, y), jax.nn.logsumexp(z, axis=1) - z[:, 0], rtol=1e-6
    )
    # DLR is invariant to shifting and positive scaling of the logits.
    np.testing.assert_allclose(losses.dlr(3 * z + 7, y), losses.dlr(z, y), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 4 classes"):
        losses.dlr(z[:, :3], y)
    with pytest.raises(ValueError, match="at least 4 classes"):
        losses.dlr_targeted(z[:, :3], y, jnp.array([1, 2]))


def test_l1_box_projection_is_exact():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 4, 4, 1)).astype(np.float32)
    v = (rng.normal(size=x.shape) * np.array([1, 1, 0.3, 0.05, 2, 0])[:, None, None, None]).astype(
        np.float32
    )
    eps = 2.0
    ours = np.asarray(project_l1_box(jnp.asarray(v), jnp.asarray(x), eps)).reshape(6, -1)
    for i in range(6):  # bisection on the threshold, float64
        a, xi = np.abs(v[i].ravel()).astype(np.float64), x[i].ravel().astype(np.float64)
        cap = np.where(v[i].ravel() >= 0, 1 - xi, xi)

        def mags(lam, a=a, cap=cap):
            return np.minimum(np.maximum(a - lam, 0), cap)

        lo, hi = 0.0, a.max() + 1
        if mags(0).sum() <= eps:
            hi = 0.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mags(mid).sum() > eps else (lo, mid)
        expect = np.sign(v[i].ravel()) * mags(hi)
        np.testing.assert_allclose(ours[i], expect, atol=2e-6)
        assert np.abs(ours[i]).sum() <= eps * (1 + 1e-6)
        assert np.all(xi + ours[i] >= 0) and np.all(xi + ours[i] <= 1)


# --- strength and semantics ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [trained_linear, trained_mlp])
def test_apgd_ce_linf_breaks_all_at_large_eps(make, data):
    x, y = data
    model = make()
    threat = Threat("Linf", 0.3)
    res = apgd(model, x, y, KEY, threat=threat)
    assert robust_acc(res) == 0.0
    assert_consistent(model, res, x, y, threat)


def test_apgd_eps_zero_is_clean_accuracy(data):
    x, y = data
    y = y.at[:8].set((y[:8] + 1) % 10)  # 8 wrong labels: clean accuracy 56/64
    model = trained_mlp()
    clean_wrong = recheck(model, x, y)
    assert clean_wrong.sum() == 8
    for norm in ("Linf", "L2"):
        res = apgd(model, x, y, KEY, threat=Threat(norm, 0.0), n_iter=20)
        np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(res.fooled), clean_wrong)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.7)])
def test_more_iterations_and_restarts_never_weaker(norm, eps, data):
    x, y = data
    model = trained_mlp()
    threat = Threat(norm, eps)
    res = {n: apgd(model, x, y, KEY, threat=threat, n_iter=n) for n in (10, 50, 100)}
    acc = {n: robust_acc(r) for n, r in res.items()}
    assert 0.0 < acc[100] < 1.0, acc  # the attack partially succeeds at this eps
    assert acc[10] >= acc[50] >= acc[100], acc
    r3 = apgd(model, x, y, KEY, threat=threat, n_iter=100, n_restarts=3)
    # Restart 0 of the 3-restart run is the 1-restart run (same key): a superset of successes.
    f1, f3 = np.asarray(res[100].fooled), np.asarray(r3.fooled)
    assert np.all(f3[f1]) and robust_acc(r3) <= acc[100]
    np.testing.assert_array_equal(np.asarray(r3.x_adv)[f1], np.asarray(res[100].x_adv)[f1])
    for r in [*res.values(), r3]:
        assert_consistent(model, r, x, y, threat)


def test_apgd_dlr_and_targeted(data):
    x, y = data
    model = trained_mlp()
    threat = Threat("Linf", 0.1)
    clean_acc = 1.0 - recheck(model, x, y).mean()
    res_dlr = apgd(model, x, y, KEY, threat=threat, loss="dlr")
    res_t = apgd_targeted(model, x, y, KEY, threat=threat, n_target_classes=9)
    for r in (res_dlr, res_t):
        assert robust_acc(r) <= clean_acc
        assert_consistent(model, r, x, y, threat)
    assert robust_acc(res_t) < 1.0
    # dlr-targeted through apgd with explicit targets (the runner-up classes).
    y_t = jax.lax.top_k(model(x), 2)[1][:, 1]
    res = apgd(model, x, y, KEY, threat=threat, loss="dlr-targeted", y_target=y_t, n_iter=20)
    assert_consistent(model, res, x, y, threat)


@pytest.mark.parametrize("largereps", [False, True])
def test_apgd_l1(largereps, data):
    x, y = data
    model = trained_mlp()
    threat = Threat("L1", 3.0)
    res = apgd(model, x, y, KEY, threat=threat, n_iter=50, use_largereps=largereps)
    assert 0.0 <= robust_acc(res) < 0.5
    assert_consistent(model, res, x, y, threat)
    big = apgd(model, x, y, KEY, threat=Threat("L1", 8.0), n_iter=50, use_largereps=largereps)
    assert robust_acc(big) == 0.0


def test_apgd_targeted_l1(data):
    x, y = data
    model = trained_mlp()
    threat = Threat("L1", 3.0)
    res = apgd_targeted(model, x, y, KEY, threat=threat, n_target_classes=3, n_iter=20)
    assert robust_acc(res) < 1.0
    assert_consistent(model, res, x, y, threat)


def test_active_mask(data):
    x, y = data
    model = trained_linear()
    threat = Threat("L2", 2.4)
    active = jnp.arange(len(y)) % 3 != 0
    res = apgd(model, x, y, KEY, threat=threat, n_iter=20, active=active)
    assert_consistent(model, res, x, y, threat, active)
    assert np.all(np.asarray(res.fooled)[np.asarray(active)])  # eps large: all active broken
    assert not np.any(np.asarray(res.fooled)[~np.asarray(active)])


# --- EOT and compilation ------------------------------------------------------------------------


class Noisy(eqx.Module):
    """A random model: the MLP on x plus Gaussian input noise drawn from the key."""

    model: eqx.Module
    sigma: float = eqx.field(static=True, default=0.05)

    def __call__(self, x, key):
        return self.model(x + self.sigma * jax.random.normal(key, x.shape))


def test_eot_gradient_is_mean_of_draws(data):
    x, y = data
    noisy = Noisy(trained_mlp())

    def loss_fn(x, k):
        z = noisy(x, k)
        return losses.cross_entropy(z, y), z

    loss, grad, logits = eot_value_and_grad(loss_fn, x, KEY, n_eot=4)
    per = [eot_value_and_grad(loss_fn, x, k, n_eot=1) for k in jax.random.split(KEY, 4)]
    assert not np.allclose(per[0][1], per[1][1])  # the draws differ
    for got, i in ((loss, 0), (grad, 1), (logits, 2)):
        np.testing.assert_allclose(got, np.mean([p[i] for p in per], axis=0), atol=1e-5)


def test_apgd_eot_random_model(data):
    x, y = data
    noisy = Noisy(trained_mlp())
    threat = Threat("Linf", 0.3)
    res = apgd(noisy, x, y, KEY, threat=threat, n_iter=20, n_eot=4)
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    assert robust_acc(res) == 0.0


TRACES = {"n": 0}


class Counting(eqx.Module):
    """Counts how often it is traced (a Python side effect runs only while tracing)."""

    model: eqx.Module

    def __call__(self, x, key):
        TRACES["n"] += 1
        return self.model(x)


def test_no_recompilation_for_same_shapes():
    model = Counting(trained_mlp())
    threat = Threat("Linf", 0.1)
    x1, y1 = synthetic_data(32, seed=5)
    x2, y2 = synthetic_data(32, seed=6)
    apgd(model, x1, y1, KEY, threat=threat, n_iter=10)
    traced = TRACES["n"]
    assert traced > 0
    res = apgd(model, x2, y2, jax.random.key(1), threat=threat, n_iter=10)
    res.fooled.block_until_ready()
    assert TRACES["n"] == traced
    # A different model instance of the same structure (new weights) reuses it too.
    other = Counting(jax.tree_util.tree_map(lambda a: a * 1.01, trained_mlp()))
    apgd(other, x2, y2, KEY, threat=threat, n_iter=10)
    assert TRACES["n"] == traced
    # The loss is an argument, not part of the program: AutoAttack's apgd-ce and apgd-dlr (and
    # explicit-target DLR) share one compilation, which through DiffPure's exact gradient is the
    # bulk of an attack's start-up time.
    apgd(model, x2, y2, KEY, threat=threat, n_iter=10, loss="dlr")
    apgd(model, x2, y2, KEY, threat=threat, n_iter=10, loss="dlr-targeted", y_target=y2 % 9 + 1)
    assert TRACES["n"] == traced


def test_argument_errors(data):
    x, y = data
    model = trained_mlp()
    with pytest.raises(ValueError, match="loss"):
        apgd(model, x, y, KEY, threat=Threat("Linf", 0.1), loss="hinge")
    with pytest.raises(ValueError, match="y_target"):
        apgd(model, x, y, KEY, threat=Threat("Linf", 0.1), loss="dlr-targeted")
    with pytest.raises(ValueError, match="L1"):
        apgd(model, x, y, KEY, threat=Threat("Linf", 0.1), use_largereps=True)
    with pytest.raises(ValueError, match="classes"):
        apgd_targeted(model, x, y, KEY, threat=Threat("Linf", 0.1), n_target_classes=10)
    # DLR needs 4 classes: on a 3-class model it fails (CE runs).
    three = lambda x, key=None: model(x)[:, :3]  # noqa: E731
    y3 = y % 3
    apgd(three, x, y3, KEY, threat=Threat("Linf", 0.1), n_iter=2).fooled.block_until_ready()
    with pytest.raises(Exception, match="at least 4 classes"):
        apgd(
            three, x, y3, KEY, threat=Threat("Linf", 0.1), n_iter=2, loss="dlr"
        ).fooled.block_until_ready()
