"""DiffAttack: the deviated-reconstruction loss, its gradient, and the attack through the runner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Killed, defended_mlp, kill_at, synthetic_data

from diffpure_jax.attacks.autoattack import autoattack_config
from diffpure_jax.attacks.base import Threat, bind_index
from diffpure_jax.attacks.diffattack import (
    DeviatedReconstruction,
    dev_steps,
    deviated_model,
    deviated_reconstruction_loss,
)
from diffpure_jax.attacks.losses import cross_entropy
from diffpure_jax.attacks.suites import autoattack_suite, diffattack_suite
from diffpure_jax.purify import Trajectory
from diffpure_jax.runner import Evaluation, read_records, run_evaluation

THREAT = Threat("Linf", 0.1)


def test_dev_steps_spread_evenly_and_end_at_the_last_step():
    assert dev_steps(100, 10) == (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    assert dev_steps(5, 10) == (1, 2, 3, 4, 5)
    assert dev_steps(10, 3) == (3, 7, 10)
    with pytest.raises(ValueError):
        dev_steps(10, 0)


def test_loss_is_the_weighted_half_mean_square():
    rng = np.random.default_rng(0)
    rev, dif = rng.normal(size=(2, 3, 2, 4, 4, 1)).astype(np.float32)
    abar = np.array([0.5, 0.9, 1.0], np.float32)
    traj = Trajectory(None, None, None, jnp.asarray(rev), jnp.asarray(dif), jnp.asarray(abar))
    want = np.mean(abar[:, None] * 0.5 * np.mean((rev - dif).reshape(3, 2, -1) ** 2, -1), 0)
    np.testing.assert_allclose(deviated_reconstruction_loss(traj), want, rtol=1e-6)


def test_objective_gradient_matches_finite_differences():
    """CE + L_dev of one draw through the exact gradient, float64, central differences."""
    with jax.enable_x64(True):
        model = defended_mlp("exact")
        x, y = synthetic_data(3, seed=1)
        x = jnp.asarray(x, jnp.float64)
        obj = deviated_model(bind_index(model, jnp.arange(3)), n_dev=3, lam=1.0)
        key = jax.random.key(4)

        def total(x):
            logits, aux = obj.logits_and_aux(x, key)
            return jnp.sum(cross_entropy(logits, y) + aux), jnp.sum(aux)

        grad, aux = jax.grad(total, has_aux=True)(x)
        assert float(aux) > 0
        h = 1e-5
        for i in range(3):
            d = jax.random.normal(jax.random.key(10 + i), x.shape, jnp.float64)
            fd = (total(x + h * d)[0] - total(x - h * d)[0]) / (2 * h)
            np.testing.assert_allclose(float(jnp.sum(grad * d)), float(fd), rtol=1e-6)


def test_objective_logits_are_the_models_and_refusals():
    model = defended_mlp("exact")
    x, _ = synthetic_data(4, seed=1)
    bound = bind_index(model, jnp.arange(4) + 7)
    obj = deviated_model(bound, n_dev=2)
    assert obj.steps == (2, 5)
    key = jax.random.key(0)
    np.testing.assert_allclose(obj(x, key), bound(x, key), rtol=1e-6)
    np.testing.assert_allclose(obj.logits_and_aux(x, key)[0], bound(x, key), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use exact"):
        DeviatedReconstruction(bind_index(model.replace(grad="bpda"), jnp.arange(4)), (1,))
    with pytest.raises(ValueError, match="purified model"):
        deviated_model(bind_index(model.classifier, jnp.arange(4)))
    with pytest.raises(ValueError, match="APGD attacks only"):
        diffattack_suite(THREAT, autoattack_config("standard"))


def _evaluation(suite, batch_size=8):
    return Evaluation(attack=suite, threat=THREAT, batch_size=batch_size, seed=3)


def test_lam_zero_is_autoattack_on_the_logits():
    """lam = 0: the same program as AutoAttack's APGD on the logits alone, the same points."""
    model = defended_mlp("exact")
    x, y = synthetic_data(4, seed=5)
    bound, key = bind_index(model, jnp.arange(4)), jax.random.key(1)
    config = autoattack_config("rand", attacks=("apgd-ce",), n_iter=3, n_eot=2)
    plain = autoattack_suite(THREAT, config)(bound, x, y, key)
    zero = diffattack_suite(THREAT, config, n_dev=3, lam=0.0)(bound, x, y, key)
    np.testing.assert_allclose(zero.x_adv, plain.x_adv, atol=1e-6)


def test_diffattack_lowers_accuracy_stays_in_threat_and_resumes(tmp_path):
    model = defended_mlp("exact")
    x, y = synthetic_data(16, seed=5)
    x, y, index = np.asarray(x), np.asarray(y), np.arange(16)
    suite = diffattack_suite(THREAT, autoattack_config("rand", n_iter=5, n_eot=2), n_dev=3)
    # Through the runner (which checks every point is inside the threat before writing it):
    # below clean; a kill after the first batch resumes to the same records.
    summary = run_evaluation(_evaluation(suite), model, x, y, index, str(tmp_path / "ok"), False)
    assert summary["clean_accuracy"] == 100.0, summary
    assert summary["robust_accuracy"]["one_draw"] < 90.0, summary
    assert summary["max_linf"] <= THREAT.eps + 1e-6
    with pytest.raises(Killed):
        run_evaluation(
            _evaluation(suite), model, x, y, index, str(tmp_path / "k"), False, kill_at(0)
        )
    assert len(read_records(str(tmp_path / "k"))) == 8
    run_evaluation(_evaluation(suite), model, x, y, index, str(tmp_path / "k"), False)
    assert read_records(str(tmp_path / "k")) == read_records(str(tmp_path / "ok"))


def test_attack_run_settings_of_the_new_attacks():
    from experiments.attack import AttackRun
    from experiments.config import identity

    default = identity(AttackRun())
    assert not {"dev_steps", "dev_weight", "n_eval"} & set(default)  # old run hashes kept
    run = AttackRun(attack="diffattack", grad="exact", dev_steps=4, dev_weight=0.5)
    assert callable(run.suite()) and identity(run)["dev_steps"] == 4
    assert callable(AttackRun(attack="diffhammer", grad="exact", n_eval=4).suite())
    refused = [
        (dict(attack="diffattack", version="standard"), "APGD attacks only"),
        (dict(attack="diffattack", defense="none"), "--defense diffpure"),
        (dict(attack="diffhammer", eot=4), "--eot does not apply"),
        (dict(attack="diffhammer", norm="L1", eps=10.0), "Linf or L2"),
        (dict(attack="diffhammer", n_eval=0), "--n-eval must be at least 1"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            AttackRun(**kwargs)
