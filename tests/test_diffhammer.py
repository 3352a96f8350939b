"""DiffHammer (`attacks.diffhammer`): the E-step, the grafted gradient against its definition,
the attack on a small trained defense, refusals, and the suite resumed through the runner."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    Killed,
    NoisyModel,
    defended_mlp,
    kill_at,
    max_rel_err,
    synthetic_data,
    trained_mlp,
)

from diffpure_jax import noise
from diffpure_jax.attacks.base import Threat, bind_index, eot_keys, in_threat
from diffpure_jax.attacks.diffhammer import (
    cw_loss,
    diffhammer,
    em_direction,
    em_weights,
    grafted_gradient,
)
from diffpure_jax.attacks.suites import diffhammer_suite
from diffpure_jax.runner import Evaluation, read_records, run_evaluation


def _unit(g, norm):
    if norm == "Linf":
        return np.sign(g)
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def _elu(v):
    return np.where(v > 0, v, np.expm1(np.minimum(v, 0)))


def _em_numpy(losses, grads, eps, norm, em_steps, em_lam):
    """The E-step from its formulas, in float64 loops (losses (N, B), grads (N, B, d))."""
    n, b, _ = grads.shape
    expected = np.zeros((n, b))
    for j in range(n):
        for i in range(n):
            expected[j] += _elu(losses[i] + eps * np.sum(_unit(grads[j], norm) * grads[i], -1))
    j_star = expected.argmax(0)
    r = grads[j_star, np.arange(b)]
    for _ in range(em_steps):
        z = losses + eps * np.sum(_unit(r, norm)[None] * grads, -1)
        w = 1.0 / (1.0 + np.exp(-em_lam * z))
        r = np.sum(w[..., None] * grads, 0) / np.sum(w, 0)[:, None]
    return r, j_star


def test_em_direction_picks_the_draw_the_formula_says():
    # Example 0: one large gradient along +x and two draws along -x: sum_i elu(<sign(g_j), g_i>)
    # is 0.736 for g_0, 1.035 for g_1 and 1.235 for g_2, so the majority's draw 2 wins.
    # Example 1: the same draws in another order (draw 0 is the winner).
    g = np.array([[2.0, 0.0], [-1.0, 0.1], [-1.0, -0.2]])
    grads = np.stack([g, g[[2, 0, 1]]], axis=1)  # (N=3, B=2, d=2)
    losses = np.zeros((3, 2))
    r, j = em_direction(jnp.asarray(losses), jnp.asarray(grads), 1.0, "Linf", em_steps=0)
    np.testing.assert_array_equal(j, [2, 0])
    np.testing.assert_allclose(r, grads[[2, 0], [0, 1]])
    r_np, j_np = _em_numpy(losses, grads, 1.0, "Linf", 0, 5.0)
    np.testing.assert_array_equal(j, j_np)

    # em_steps=1 (their code): one reweighting around g_{j*}.
    rng = np.random.default_rng(0)
    losses = rng.normal(size=(5, 3))
    grads = rng.normal(size=(5, 3, 7))
    for norm in ("Linf", "L2"):
        r, j = em_direction(jnp.asarray(losses), jnp.asarray(grads), 0.3, norm, 1, 2.0)
        r_np, j_np = _em_numpy(losses, grads, 0.3, norm, 1, 2.0)
        np.testing.assert_array_equal(j, j_np)
        g0 = grads[j_np, np.arange(3)]
        w = 1 / (1 + np.exp(-2.0 * (losses + 0.3 * np.sum(_unit(g0, norm)[None] * grads, -1))))
        one_step = np.sum(w[..., None] * grads, 0) / w.sum(0)[:, None]
        np.testing.assert_allclose(r, one_step, rtol=1e-5, atol=1e-6)
        r5, _ = em_direction(jnp.asarray(losses), jnp.asarray(grads), 0.3, norm, 5, 2.0)
        r5_np = _em_numpy(losses, grads, 0.3, norm, 5, 2.0)[0]
        np.testing.assert_allclose(r5, r5_np, rtol=1e-5, atol=1e-6)


def test_em_weights_go_to_the_draws_broken_to_first_order():
    rng = np.random.default_rng(1)
    grads = jnp.asarray(0.1 * rng.normal(size=(4, 1, 6)))
    losses = jnp.asarray([[1.0], [0.5], [-5.0], [-6.0]])  # CW: draws 0 and 1 are broken
    w = em_weights(losses, grads, grads[0], 0.1, "Linf", 5.0)
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
    assert float(w[2:].max()) < 1e-9 and float(w[:2].min()) > 0.4
    # Each E-step reweights around the previous direction: r_5 = sum_i w_i(r_4) g_i.
    r4, _ = em_direction(losses, grads, 0.1, "Linf", 4, 5.0)
    r5, _ = em_direction(losses, grads, 0.1, "Linf", 5, 5.0)
    w = em_weights(losses, grads, r4, 0.1, "Linf", 5.0)
    assert float(w[2:].max()) < 1e-9
    np.testing.assert_allclose(r5, w[0, :, None] * grads[0] + w[1, :, None] * grads[1], atol=1e-7)
    # A step of eps along the draws' common direction breaks a draw to first order: it gets weight.
    g = jnp.asarray([[[1.0, 1.0]], [[1.0, 1.0]], [[-1.0, -1.0]]])
    w = em_weights(jnp.asarray([[-0.5], [-3.0], [-0.5]]), g, g[0], 0.5, "Linf", 5.0)
    assert float(w[0, 0]) > 0.99  # -0.5 + 0.5 * 2 > 0; draw 2 would go the other way
    # Every draw far from broken: every sigmoid underflows in float32, the weights stay finite.
    w = em_weights(jnp.full((3, 1), -40.0), g, g[0], 0.0, "Linf", 5.0)
    np.testing.assert_allclose(w[:, 0], 1 / 3, rtol=1e-6)


def test_grafted_gradient_is_the_jacobian_product_of_the_selected_draw():
    model = defended_mlp("exact")
    purifier = model.purifier
    x, y = synthetic_data(3, seed=5)
    index = jnp.asarray([4, 9, 17])
    n, eps = 5, 0.1
    draws = eot_keys(jax.random.key(3), n)

    @eqx.filter_jit
    def classifier_grad(model, x, key, index):  # one draw: its CW loss and gradient at x^
        x_hat = model.purifier(x, key, index)

        def total(v):
            loss = cw_loss(model.classifier(v, check=False), y)
            return jnp.sum(loss), loss

        return jax.grad(total, has_aux=True)(x_hat)

    @eqx.filter_jit
    def jacobian(purifier, v, key, index):  # (64, 64) of one example's purification
        return jax.jacrev(lambda u: purifier(u.reshape(1, *x.shape[1:]), key, index).ravel())(v)

    # Per-draw classifier gradients at the purified images, one draw at a time.
    losses, grads = [], []
    for d in range(n):
        g, loss = classifier_grad(model, x, draws[d], index)
        losses.append(np.asarray(loss))
        grads.append(np.asarray(g).reshape(3, -1))
    losses, grads = np.stack(losses), np.stack(grads)
    r, j = em_direction(jnp.asarray(losses), jnp.asarray(grads), eps, "Linf", 5, 5.0)
    r_np, j_np = _em_numpy(losses.astype(np.float64), grads.astype(np.float64), eps, "Linf", 5, 5)
    np.testing.assert_array_equal(j, j_np)
    assert max_rel_err(r, r_np) < 1e-5

    # Per-example keys of each example's selected draw; the grafted gradient with cotangent r.
    keys = jnp.stack([noise.example_keys(draws[int(j[b])], index[b : b + 1])[0] for b in range(3)])
    graft = eqx.filter_jit(grafted_gradient)
    grafted = graft(purifier, x, keys, r.reshape(x.shape))
    slow = []
    for b in range(3):
        jac = jacobian(purifier, x[b].ravel(), draws[int(j[b])], index[b : b + 1])
        slow.append(np.asarray(jac, np.float64).T @ np.asarray(r[b], np.float64))
    err = max_rel_err(np.asarray(grafted).reshape(3, -1), np.stack(slow))
    assert err < 1e-5, err

    # With r the classifier gradient of one draw, grafting is that draw's full gradient.
    k2 = noise.example_keys(draws[2], index)
    grafted = graft(purifier, x, k2, jnp.asarray(grads[2]).reshape(x.shape))
    full = eqx.filter_jit(jax.grad(lambda v, m: jnp.sum(cw_loss(m(v, draws[2], index), y))))
    assert max_rel_err(grafted, full(x, model)) < 1e-5

    # bpda: the VJP is the cotangent itself; blind has none.
    bpda = model.replace(grad="bpda").purifier
    np.testing.assert_allclose(graft(bpda, x, keys, r.reshape(x.shape)), r.reshape(x.shape))
    with pytest.raises(ValueError, match="blind"):
        grafted_gradient(model.replace(grad="blind").purifier, x, keys, r.reshape(x.shape))


@pytest.fixture(scope="module")
def attacked():
    model = defended_mlp("exact")
    x, y = synthetic_data(12, seed=3)
    m = bind_index(model, jnp.arange(12) + 100)
    active = jnp.ones(12, bool).at[jnp.asarray([2, 7])].set(False)
    threat = Threat("Linf", 0.1)  # breaks some draws of most examples, not every draw
    r = diffhammer(
        m, x, y, jax.random.key(1), threat=threat, n_iter=6, n_restarts=2, n_eval=4,
        active=active,
    )  # fmt: skip
    return m, x, y, active, threat, r


@eqx.filter_jit
def _wrong(model, x, y, key):
    """(16, B) bool: 16 draws of the model misclassify x."""
    return jax.vmap(lambda k: jnp.argmax(model(x, k), -1) != y)(eot_keys(key, 16))


def test_diffhammer_breaks_the_defense_inside_the_threat(attacked):
    m, x, y, active, threat, r = attacked
    clean = ~_wrong(m, x, y, jax.random.key(7))
    assert float(clean.mean()) >= 0.95
    robust = float(jnp.mean(~r.fooled[active]))
    assert robust <= 0.75, robust  # 0.6 measured
    assert bool(jnp.all(in_threat(r.x_adv, x, threat)))
    # Inactive examples come back unchanged and unscored.
    np.testing.assert_array_equal(r.x_adv[~active], x[~active])
    assert not bool(jnp.any(r.fooled[~active] | r.any_success[~active]))
    np.testing.assert_array_equal(r.avg_success[~active], 0.0)
    # The N-evaluation metrics: fractions of 4 draws, broken somewhere iff some fraction > 0.
    np.testing.assert_allclose(r.avg_success * 4, jnp.round(r.avg_success * 4), atol=1e-6)
    np.testing.assert_array_equal(r.any_success, r.avg_success > 0)
    assert float(r.avg_success[active].mean()) >= 0.5  # 0.725 measured
    # A fresh look at x_adv: its draws are misclassified far more often than the clean point's.
    wrong = _wrong(m, r.x_adv, y, jax.random.key(8))
    assert float(wrong[:, active].mean()) >= 0.25  # 0.37 measured


def test_a_restart_only_improves_on_the_examples_it_attacks(attacked):
    m, x, y, active, threat, two = attacked  # 2 restarts; restart 0 is this 1-restart run
    one = diffhammer(
        m, x, y, jax.random.key(1), threat=threat, n_iter=6, n_restarts=1, n_eval=4,
        active=active,
    )  # fmt: skip
    assert bool(jnp.all(two.avg_success >= one.avg_success))
    assert bool(jnp.all(two.any_success | ~one.any_success))
    kept = two.avg_success == one.avg_success  # restart 1 skipped them or did no better
    np.testing.assert_array_equal(two.x_adv[kept], one.x_adv[kept])
    assert bool(jnp.all(kept[one.avg_success > 0.5]))  # above the threshold: not attacked again
    assert bool(jnp.any(~kept))  # and restart 1 did improve some example


def test_diffhammer_l2_bpda_and_the_three_losses():
    model = defended_mlp("bpda")
    x, y = synthetic_data(4, seed=4)
    threat = Threat("L2", 1.0)
    # Restarts with the CW, CE and DLR losses in turn, every example attacked by each.
    r = diffhammer(
        bind_index(model, jnp.arange(4)), x, y, jax.random.key(2), threat=threat, n_iter=3,
        n_restarts=3, n_eval=2, restart_threshold=1.0,
    )  # fmt: skip
    assert bool(jnp.all(in_threat(r.x_adv, x, threat)))
    assert bool(jnp.all(jnp.isfinite(r.x_adv)))
    np.testing.assert_array_equal(r.any_success, r.avg_success > 0)


def test_diffhammer_refusals():
    model = defended_mlp("exact")
    x, y = synthetic_data(2)
    m = bind_index(model, jnp.arange(2))
    key, threat = jax.random.key(0), Threat("Linf", 0.1)
    with pytest.raises(ValueError, match="blind"):
        diffhammer(bind_index(model.replace(grad="blind"), jnp.arange(2)), x, y, key, threat=threat)
    with pytest.raises(ValueError, match="DefendedClassifier"):
        diffhammer(bind_index(NoisyModel(trained_mlp()), jnp.arange(2)), x, y, key, threat=threat)
    with pytest.raises(ValueError, match="bind_index"):
        diffhammer(model, x, y, key, threat=threat)
    with pytest.raises(ValueError, match="Linf and L2"):
        diffhammer(m, x, y, key, threat=Threat("L1", 1.0))
    with pytest.raises(ValueError, match="Linf or L2"):
        diffhammer_suite(Threat("L1", 1.0))
    for bad in ({"n_eval": 0}, {"n_iter": 2.5}, {"em_steps": -1}, {"losses": ("cw",)}):
        with pytest.raises(ValueError):
            diffhammer(m, x, y, key, threat=threat, **bad)


def test_diffhammer_suite_resumes_through_the_runner(tmp_path):
    threat = Threat("Linf", 0.12)
    ev = Evaluation(
        attack=diffhammer_suite(threat, n_iter=3, n_restarts=2, n_eval=2),  # one compilation
        threat=threat,
        protocols=("one_draw", "worst_of_2"),
        batch_size=4,
        seed=4,
        description={"test": "diffhammer"},
    )

    x, y = synthetic_data(8, seed=9)
    x, y, index = np.asarray(x), np.asarray(y), np.arange(8) + 30
    model = defended_mlp("exact")
    full = run_evaluation(ev, model, x, y, index, str(tmp_path / "full"), False)
    with pytest.raises(Killed):
        run_evaluation(ev, model, x, y, index, str(tmp_path / "part"), False, kill_at(0))
    assert len(read_records(str(tmp_path / "part"))) == 4
    resumed = run_evaluation(ev, model, x, y, index, str(tmp_path / "part"), False)

    def by_index(d):
        return sorted(read_records(str(tmp_path / d)), key=lambda r: r["index"])

    assert by_index("full") == by_index("part") and len(by_index("full")) == 8
    assert full == resumed
    assert full["robust_accuracy"]["one_draw"] < full["clean_accuracy"]
    assert full["max_linf"] <= 0.12 + 1e-6
    # The attack's own N-evaluation scores are recorded next to the protocols': its Wor.Rob
    # (any draw at any iterate) is at most its Avg.Rob, and 0 where the clean draw was wrong.
    robust = full["robust_accuracy"]
    assert {"diffhammer_average_of_2", "diffhammer_worst_of_2"} <= set(robust)
    assert robust["diffhammer_worst_of_2"] <= robust["diffhammer_average_of_2"]
    for r in by_index("full"):
        if r["clean_pred"] != r["label"]:
            assert not r["robust"]["diffhammer_worst_of_2"]
            assert r["robust"]["diffhammer_average_of_2"] == 0.0
