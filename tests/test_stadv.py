"""StAdv: parity of the flow geometry with mister_ed's FullSpatial, the attack, its threat check."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MLP, NoisyModel, nhwc

from diffpure_jax.attacks.base import Threat, in_threat, project
from diffpure_jax.attacks.stadv import (
    flow_grid,
    flow_linf,
    flow_norm,
    grid_sample,
    project_flow,
    stadv,
)
from diffpure_jax.attacks.suites import SuiteResult, stadv_suite
from diffpure_jax.runner import Evaluation, read_records, run_evaluation
from experiments.attack import AttackRun

REF = "/work/shared/reference/stadv_flow_small_io.npz"
SIDE = 32  # 0.05 normalised units is 0.8 px here, as on CIFAR-10


def textures(n: int, seed: int):
    """(x (n, 32, 32, 1) in [0, 1], y (n,)): 10 classes, each a random pixel texture in
    [0.2, 0.8], plus small noise. Shifting a texture by under a pixel changes it a lot."""
    kp, ky, kn = jax.random.split(jax.random.key(99), 3)
    protos = jax.random.uniform(kp, (10, SIDE, SIDE, 1), minval=0.2, maxval=0.8)
    ky, kn = jax.random.split(jax.random.fold_in(ky, seed))
    y = jax.random.randint(ky, (n,), 0, 10)
    x = protos[y] + 0.05 * jax.random.normal(kn, (n, SIDE, SIDE, 1))
    return jnp.clip(x, 0.0, 1.0), y.astype(jnp.int32)


@pytest.fixture(scope="module")
def linear32():
    """A linear classifier of 32x32 textures, trained to 100% clean accuracy."""
    x, y = textures(512, seed=1)
    model = MLP(jnp.zeros((SIDE * SIDE, 10)), jnp.zeros(10), None, None)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(model, state):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        updates, state = opt.update(jax.grad(loss)(model), state, model)
        return optax.apply_updates(model, updates), state

    state = opt.init(model)
    for _ in range(100):
        model, state = step(model, state)
    return model


def test_flow_geometry_matches_mister_ed():
    ref = np.load(REF)
    x, bound = nhwc(ref["x"]), float(ref["bound"])
    identity = flow_grid(x.shape)
    err = {"identity": float(np.abs(identity - ref["identity_grid"]).max())}
    projected = project_flow(jnp.asarray(ref["identity_grid"] + ref["delta"]), bound)
    err["project"] = float(np.abs(projected - ref["grid_projected"]).max())
    out = grid_sample(x, jnp.asarray(ref["grid_projected"]))
    err["sample"] = float(np.abs(nhwc(ref["out"]) - out).max())
    norm = flow_norm(jnp.asarray(ref["grid_projected"]))
    err["norm_rel"] = float(np.abs(norm - ref["stadv_norm"]).max() / ref["stadv_norm"].max())
    print("parity errors:", err)
    assert err["identity"] <= 1e-6 and err["project"] <= 1e-6, err
    assert err["sample"] <= 1e-5 and err["norm_rel"] <= 1e-5, err
    assert float(flow_linf(projected).max()) <= bound + 1e-6
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_zero_flow_is_identity_map_and_sampling_stays_in_unit_box():
    x = jax.random.uniform(jax.random.key(0), (2, 5, 7, 3))  # not square
    identity = flow_grid(x.shape)
    assert float(jnp.abs(grid_sample(x, identity) - x).max()) <= 1e-6
    assert float(flow_linf(identity).max()) == 0.0
    # Zero flow: only the 1e-10 under each square root is left (4 neighbours, H W pixels).
    np.testing.assert_allclose(flow_norm(identity), 4 * 5 * 7 * 1e-5, rtol=1e-5)
    far = jax.random.uniform(jax.random.key(1), identity.shape, minval=-1.5, maxval=1.5)
    out = grid_sample(x, far)  # partly outside the image: zero padding
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_grid_sample_gradient_in_grid_matches_finite_differences():
    x = jax.random.uniform(jax.random.key(2), (1, 6, 6, 2))
    grid = flow_grid(x.shape) + 0.03  # inside pixel cells: bilinear, smooth in the grid
    v = jax.random.normal(jax.random.key(3), grid.shape)
    w = jax.random.normal(jax.random.key(4), x.shape)
    f = lambda g: jnp.sum(w * grid_sample(x, g))  # noqa: E731
    h = 1e-3
    fd = (f(grid + h * v) - f(grid - h * v)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(jax.grad(f)(grid), v), fd, rtol=1e-2)


def test_stadv_at_the_paper_bound_breaks_a_trained_model(linear32):
    x, y = textures(32, seed=3)
    model = lambda x, key: linear32(x)  # noqa: E731
    active = jnp.arange(32) % 4 != 0
    r = stadv(model, x, y, jax.random.key(0), bound=0.05, n_eot=1, active=active)
    clean = float(jnp.mean(jnp.argmax(linear32(x), -1)[active] == y[active]))
    after = float(jnp.mean(jnp.argmax(linear32(r.x_adv), -1)[active] == y[active]))
    print(f"clean accuracy {clean:.3f}, after StAdv at 0.05: {after:.3f}")
    assert clean == 1.0 and after <= 0.1
    np.testing.assert_array_equal(r.fooled, active & (jnp.argmax(linear32(r.x_adv), -1) != y))
    # Every grid is within the bound, every image in [0, 1] and the grid's sample of x.
    assert float(flow_linf(r.grid).max()) <= 0.05 + 1e-6
    assert float(jnp.abs(r.grid).max()) <= 1.0
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    assert bool(jnp.all(in_threat(r.x_adv, x, Threat("StAdv", 0.05), grid=r.grid)))
    # Inactive examples are unchanged.
    np.testing.assert_array_equal(r.x_adv[~active], x[~active])
    np.testing.assert_array_equal(r.grid[~active], flow_grid(x.shape)[~active])
    assert not bool(jnp.any(r.fooled[~active]))


def test_stadv_with_eot_on_a_noisy_model(linear32):
    x, y = textures(8, seed=4)
    noisy = NoisyModel(linear32, scale=0.5)
    r = stadv(noisy, x, y, jax.random.key(1), bound=0.05, n_iter=30, n_eot=4)
    again = stadv(noisy, x, y, jax.random.key(1), bound=0.05, n_iter=30, n_eot=4)
    np.testing.assert_array_equal(r.grid, again.grid)  # a function of the key
    assert float(flow_linf(r.grid).max()) <= 0.05 + 1e-6
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    assert float(jnp.mean(jnp.argmax(linear32(r.x_adv), -1) == y)) <= 0.5


def test_threat_check_needs_and_checks_the_grid():
    threat = Threat("StAdv", 0.05)
    assert threat.spatial and not Threat("Linf", 0.1).spatial
    x = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
    grid = project_flow(
        flow_grid(x.shape) + 0.2 * jax.random.normal(jax.random.key(6), (3, 8, 8, 2)), 0.05
    )
    x_adv = grid_sample(x, grid)
    with pytest.raises(ValueError, match="grid"):
        in_threat(x_adv, x, threat)
    with pytest.raises(ValueError, match="project_flow"):
        project(x_adv, x, threat)
    assert bool(jnp.all(in_threat(x_adv, x, threat, grid=grid)))
    beyond = grid.at[1].add(0.02)  # past the bound
    tampered = x_adv.at[2].add(0.01)  # not the grid's sample of x
    np.testing.assert_array_equal(in_threat(x_adv, x, threat, grid=beyond), [True, False, True])
    np.testing.assert_array_equal(in_threat(tampered, x, threat, grid=grid), [True, True, False])


def _evaluation(attack):
    return Evaluation(
        attack=attack,
        threat=Threat("StAdv", 0.05),
        protocols=("one_draw", "majority_of_3"),
        batch_size=3,
        seed=2,
        description={"test": "stadv"},
    )


def test_stadv_suite_through_the_runner(tmp_path, linear32):
    x, y = textures(6, seed=5)  # two batches of 3: one compile
    x, y, index = np.asarray(x), np.asarray(y), np.arange(6) + 40
    model = NoisyModel(linear32, scale=0.5)
    suite = stadv_suite(Threat("StAdv", 0.05), n_iter=10, n_eot=2)
    summary = run_evaluation(_evaluation(suite), model, x, y, index, str(tmp_path / "ok"), False)
    records = read_records(str(tmp_path / "ok"))
    assert len(records) == 6 and summary["n_examples"] == 6
    assert all(0.0 <= r["flow_linf"] <= 0.05 + 1e-6 for r in records)
    assert summary["max_flow_linf"] <= 0.05 + 1e-6
    assert summary["robust_accuracy"]["one_draw"] < summary["clean_accuracy"]
    adv = np.load(tmp_path / "ok" / "adv" / "batch_00000.npz")
    sampled = grid_sample(jnp.asarray(x[:3]), jnp.asarray(adv["grid"]))
    np.testing.assert_allclose(adv["x_adv"], sampled, atol=1e-6)

    def beyond_bound(model, x, y, key):  # a broken attack: the flow goes past the bound
        grid = flow_grid(x.shape) + 0.06
        pred = jnp.argmax(model(x, key), -1)
        return SuiteResult(grid_sample(x, grid), {"broken": pred}, pred == y, pred, grid)

    with pytest.raises(RuntimeError, match="outside the"):
        run_evaluation(_evaluation(beyond_bound), model, x, y, index, str(tmp_path / "bad"), False)
    assert read_records(str(tmp_path / "bad")) == []

    def no_grid(model, x, y, key):
        return SuiteResult(*beyond_bound(model, x, y, key)[:4])

    with pytest.raises(RuntimeError, match="no sampling grid"):
        run_evaluation(_evaluation(no_grid), model, x, y, index, str(tmp_path / "none"), False)


def test_attack_run_stadv_settings():
    run = AttackRun(attack="stadv", norm="StAdv", eps=0.05, defense="none", eot=3, n_iter=7)
    assert run.threat() == Threat("StAdv", 0.05) and callable(run.suite())
    with pytest.raises(ValueError, match="--norm StAdv"):
        AttackRun(attack="stadv")  # the default Linf threat
    with pytest.raises(ValueError, match="--attack stadv"):
        AttackRun(attack="pgd-eot", norm="StAdv", eps=0.05)
    with pytest.raises(ValueError, match=r"\(0, 2\]"):
        AttackRun(attack="stadv", norm="StAdv", eps=3.0)
