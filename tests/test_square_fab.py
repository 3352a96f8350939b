"""Square Attack and FAB on small trained models, and FAB's hyperplane-box projections checked
against independent solvers (scipy's linprog for Linf and L1, active-set enumeration for L2)."""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import synthetic_data, trained_linear, trained_mlp
from scipy.optimize import linprog

from diffpure_jax.attacks.base import Threat, in_threat, lp_norm
from diffpure_jax.attacks.fab import fab, projection_l1, projection_l2, projection_linf
from diffpure_jax.attacks.square import eta_pattern, p_selection, square

PROJECTIONS = {"Linf": projection_linf, "L2": projection_l2, "L1": projection_l1}
ORD = {"Linf": np.inf, "L2": 2, "L1": 1}


def _pred(model, x):
    return jnp.argmax(model(x, None), -1)


def _fab_fast(model, x, y, threat, **kw):
    kw = {"n_iter": 30, "n_target_classes": 3, **kw}
    return fab(model, x, y, jax.random.key(1), threat=threat, **kw)


# ---------------------------------------------------------------- projections vs. solvers


def _optimum_lp(t, w, b, norm):
    """min ||delta|| s.t. w . (t + delta) = b, 0 <= t + delta <= 1 (Linf or L1) by linprog."""
    d = len(t)
    if norm == "Linf":  # variables (delta, s): min s, -s <= delta_i <= s
        cost = np.r_[np.zeros(d), 1.0]
        a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        res = linprog(
            cost,
            A_ub=a_ub,
            b_ub=np.zeros(2 * d),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[b - w @ t],
            bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)],
            method="highs",
        )
    else:  # delta = u - v, u, v >= 0: min sum(u + v)
        res = linprog(
            np.ones(2 * d),
            A_eq=np.r_[w, -w][None],
            b_eq=[b - w @ t],
            bounds=[(0, 1 - ti) for ti in t] + [(0, ti) for ti in t],
            method="highs",
        )
    assert res.status == 0
    return res.fun


def _optimum_l2(t, w, b):
    """Exact least-L2 delta by enumerating which coordinates sit at a box bound (3^d sets)."""
    lo, hi, target = -t, 1 - t, b - w @ t
    best = np.inf
    for status in itertools.product(range(3), repeat=len(t)):
        status = np.asarray(status)
        fixed = np.where(status == 1, lo, np.where(status == 2, hi, 0.0))
        wf = np.where(status == 0, w, 0.0)
        rest = target - w @ fixed
        if wf @ wf < 1e-14:
            if abs(rest) > 1e-12:
                continue
            delta = fixed
        else:
            delta = fixed + rest / (wf @ wf) * wf
        if np.all(delta >= lo - 1e-12) and np.all(delta <= hi + 1e-12):
            best = min(best, float(np.linalg.norm(delta)))
    return best


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_projection_matches_solver(norm):
    rng = np.random.default_rng({"Linf": 0, "L2": 1, "L1": 2}[norm])
    rows = []
    for i in range(60):
        d = int(rng.integers(1, 6))
        t, w = rng.uniform(0, 1, d), rng.normal(size=d)
        if i % 4 == 0:
            w[rng.integers(d)] = 0.0
        rows.append((t, w, float(w @ rng.uniform(0, 1, d))))  # a feasible hyperplane
    project = PROJECTIONS[norm]
    for t, w, b in rows:
        delta = np.asarray(
            project(
                jnp.asarray(t[None], jnp.float32),
                jnp.asarray(w[None], jnp.float32),
                jnp.asarray([b], jnp.float32),
            )[0],
            np.float64,
        )
        z = t + delta
        assert np.all(z >= -1e-6) and np.all(z <= 1 + 1e-6)
        assert abs(w @ z - b) < 1e-4
        best = _optimum_l2(t, w, b) if norm == "L2" else _optimum_lp(t, w, b, norm)
        assert abs(np.linalg.norm(delta, ORD[norm]) - best) < 1e-4, (t, w, b, delta, best)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_projection_batch_and_infeasible(norm):
    """A batch of 40-dim problems: feasible rows agree with linprog (Linf, L1) or lie on the
    hyperplane no farther than the L2 projection without the box; an unreachable hyperplane
    gives the box corner closest to it (the reference's choice)."""
    rng = np.random.default_rng(3)
    n, d = 24, 40
    t = rng.uniform(0, 1, (n, d))
    w = rng.normal(size=(n, d))
    w[:, :4] = 0.0
    b = np.einsum("nd,nd->n", w, np.clip(t + 0.2 * rng.normal(size=(n, d)), 0, 1))
    gap = np.einsum("nd,nd->n", w, t) - b
    far = np.arange(n) % 4 == 0
    b = np.where(far, b - np.sign(gap) * 1e3, b)
    delta = np.asarray(
        PROJECTIONS[norm](*(jnp.asarray(a, jnp.float32) for a in (t, w, b))), np.float64
    )
    z = t + delta
    assert np.all(z >= -1e-6) and np.all(z <= 1 + 1e-6)
    for i in range(n):
        if far[i]:
            side = np.sign(w[i] @ t[i] - b[i])
            corner = np.where(w[i] * side > 0, -t[i], 1 - t[i]) * (w[i] != 0)
            np.testing.assert_allclose(delta[i], corner, atol=1e-6)
            continue
        assert abs(w[i] @ z[i] - b[i]) < 1e-3
        got = np.linalg.norm(delta[i], ORD[norm])
        if norm == "L2":
            assert got >= abs(w[i] @ t[i] - b[i]) / np.linalg.norm(w[i]) - 1e-5
        else:
            assert abs(got - _optimum_lp(t[i], w[i], b[i], norm)) < 1e-4


# ---------------------------------------------------------------- Square


def test_square_schedule_and_pattern():
    assert p_selection(0, 5000, 0.8) == 0.8
    assert p_selection(6, 5000, 0.8) == 0.4  # it = 12
    assert p_selection(4999, 5000, 0.8) == 0.8 / 512
    pat = eta_pattern(5)
    np.testing.assert_allclose(np.sum(pat**2), 1.0, rtol=1e-6)
    assert np.all(pat[:2] > 0) and np.all(pat[2:] < 0)
    assert np.argmax(pat[1]) == 2  # peak at the centre of the top rectangle


def test_square_defeats_gradient_masking():
    """A quantised input (zero gradient almost everywhere) stops a gradient attack, not Square."""
    mlp = trained_mlp()

    def masked(x, key=None):
        return mlp(jnp.round(x * 8) / 8)

    x, y = synthetic_data(64, seed=3)
    threat = Threat("Linf", 0.15)
    clean = float(jnp.mean(_pred(masked, x) == y))
    assert clean > 0.9

    def ce(xa):
        return optax.softmax_cross_entropy_with_integer_labels(masked(xa), y).sum()

    x_pgd = x
    for _ in range(20):
        x_pgd = x_pgd + threat.eps / 4 * jnp.sign(jax.grad(ce)(x_pgd))
        x_pgd = jnp.clip(jnp.clip(x_pgd, x - threat.eps, x + threat.eps), 0.0, 1.0)
    robust_pgd = float(jnp.mean(_pred(masked, x_pgd) == y))
    assert robust_pgd == clean

    res = square(masked, x, y, jax.random.key(0), threat=threat, n_queries=300)
    robust_square = float(jnp.mean(~res.fooled))
    assert robust_square < clean - 0.5, robust_square
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    np.testing.assert_array_equal(np.asarray(_pred(masked, res.x_adv) != y), res.fooled)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.3), ("L2", 4.0)])
def test_square_large_eps_breaks_linear(norm, eps):
    model = trained_linear()
    x, y = synthetic_data(32, seed=4)
    threat = Threat(norm, eps)
    res = square(model, x, y, jax.random.key(0), threat=threat, n_queries=200)
    assert bool(jnp.all(res.fooled))
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    assert bool(jnp.all(_pred(model, res.x_adv) != y))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_zero_eps(norm):
    model = trained_linear()
    x, y = synthetic_data(32, seed=4)
    res = square(model, x, y, jax.random.key(0), threat=Threat(norm, 0.0), n_queries=20)
    np.testing.assert_array_equal(np.asarray(res.fooled), np.asarray(_pred(model, x) != y))
    np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(x))


def test_square_l1_not_implemented():
    x, y = synthetic_data(2)
    with pytest.raises(NotImplementedError):
        square(trained_linear(), x, y, jax.random.key(0), threat=Threat("L1", 1.0))


# ---------------------------------------------------------------- FAB


@pytest.mark.parametrize("norm,eps", [("Linf", 0.3), ("L2", 4.0), ("L1", 20.0)])
def test_fab_large_eps_breaks_linear(norm, eps):
    model = trained_linear()
    x, y = synthetic_data(32, seed=4)
    threat = Threat(norm, eps)
    for targeted in (True, False):
        res = _fab_fast(model, x, y, threat, targeted=targeted)
        assert bool(jnp.all(res.fooled))
        assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
        assert bool(jnp.all(_pred(model, res.x_adv) != y))


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_fab_zero_eps(norm):
    model = trained_linear()
    x, y = synthetic_data(32, seed=4)
    res = _fab_fast(model, x, y, Threat(norm, 0.0))
    np.testing.assert_array_equal(np.asarray(res.fooled), np.asarray(_pred(model, x) != y))
    np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(x))


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.7), ("L1", 3.0)])
def test_fab_t_mlp_moderate_eps(norm, eps):
    """FAB-T at an eps that breaks some points but not all: fooled points are misclassified and
    inside the threat, the others are returned unchanged, and the minimal norms stay <= eps."""
    model = trained_mlp()
    x, y = synthetic_data(64, seed=3)
    threat = Threat(norm, eps)
    res = fab(model, x, y, jax.random.key(0), threat=threat, n_iter=50, n_target_classes=3)
    fooled = np.asarray(res.fooled)
    assert 0 < fooled.mean() < 1, fooled.mean()
    assert bool(jnp.all(in_threat(res.x_adv, x, threat)))
    pred = np.asarray(_pred(model, res.x_adv))
    assert np.all(pred[fooled] != np.asarray(y)[fooled])
    np.testing.assert_array_equal(np.asarray(res.x_adv)[~fooled], np.asarray(x)[~fooled])
    norms = np.asarray(lp_norm(res.x_adv - x, norm))
    assert np.all(norms[fooled] > 0) and np.all(norms <= eps * (1 + 1e-5))


def test_fab_restarts_do_not_hurt():
    """The first run of each target starts at x with the same key, so restarts only add."""
    model = trained_mlp()
    x, y = synthetic_data(64, seed=3)
    threat = Threat("Linf", 0.1)
    one = _fab_fast(model, x, y, threat, n_iter=20, n_restarts=1)
    more = _fab_fast(model, x, y, threat, n_iter=20, n_restarts=2)
    assert int(more.fooled.sum()) >= int(one.fooled.sum())


def test_untargeted_fab_restarts_extend_and_beat_a_masked_gradient():
    """Untargeted FAB's restart r is run r = fold_in(key, r), the first from x and the others
    from random starts (the reference's), each on the examples not yet fooled: more restarts
    extend fewer. At x the masked model's gradient is zero, so only the random starts move."""
    mlp = trained_mlp()
    x, y = synthetic_data(32, seed=3)
    eps = 0.15
    threat = Threat("Linf", eps)

    def masked(xx, key):  # within the threat, xx - x -> (xx - x)^3 / eps^2 is still inside
        return mlp(x + (xx - x) ** 3 / eps**2, key)

    runs = [
        fab(masked, x, y, jax.random.key(1), threat=threat, targeted=False, n_iter=20, n_restarts=r)
        for r in (1, 2, 3)
    ]
    counts = [int(r.fooled.sum()) for r in runs]
    assert counts[0] == 0 and counts[2] > 16, counts
    for fewer, more in zip(runs, runs[1:], strict=False):
        f = np.asarray(fewer.fooled)
        assert np.all(np.asarray(more.fooled)[f])
        np.testing.assert_array_equal(np.asarray(more.x_adv)[f], np.asarray(fewer.x_adv)[f])
    last = runs[-1]
    assert bool(jnp.all(in_threat(last.x_adv, x, threat)))
    pred = np.asarray(jnp.argmax(masked(last.x_adv, None), -1))
    assert np.all(pred[np.asarray(last.fooled)] != np.asarray(y)[np.asarray(last.fooled)])


# ---------------------------------------------------------------- active masks, compilation


class _Counting(eqx.Module):
    """Counts its traces (one per call made while tracing the attack)."""

    model: eqx.Module
    counter: list = eqx.field(static=True)

    def __call__(self, x, key):
        self.counter.append(1)
        return self.model(x, key)


@pytest.mark.parametrize("attack", ["square", "fab"])
def test_active_mask_and_no_recompilation(attack):
    counter: list = []
    model = _Counting(trained_mlp(), counter)
    threat = Threat("Linf", 0.3)

    def run(x, y, active):
        if attack == "square":
            return square(
                model, x, y, jax.random.key(0), threat=threat, n_queries=300, active=active
            )
        return _fab_fast(model, x, y, threat, n_iter=10, n_target_classes=2, active=active)

    x1, y1 = synthetic_data(16, seed=5)
    x2, y2 = synthetic_data(16, seed=6)
    active = jnp.arange(16) % 2 == 0
    res1 = run(x1, y1, active)
    traces = len(counter)
    assert traces > 0
    res2 = run(x2, y2, ~active)
    assert len(counter) == traces  # same shapes: no retracing
    for res, x, act in ((res1, x1, active), (res2, x2, ~active)):
        act = np.asarray(act)
        np.testing.assert_array_equal(np.asarray(res.x_adv)[~act], np.asarray(x)[~act])
        assert not np.any(np.asarray(res.fooled)[~act])
        assert np.all(np.asarray(res.fooled)[act])  # eps = 0.3 breaks every active point
