"""DiffAttack: the deviated-reconstruction loss, its gradient, and the attack through the runner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Killed, NoisyModel, defended_mlp, kill_at, synthetic_data, trained_mlp

from diffpure_jax.attacks.apgd import apgd
from diffpure_jax.attacks.autoattack import autoattack_config
from diffpure_jax.attacks.base import AuxObjective, Threat, bind_index
from diffpure_jax.attacks.diffattack import (
    DeviatedReconstruction,
    dev_steps,
    deviated_model,
    deviated_reconstruction_loss,
)
from diffpure_jax.attacks.losses import cross_entropy
from diffpure_jax.attacks.suites import diffattack_suite
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
    model = defended_mlp("exact")  # outside x64: the cached trained MLP is float32's
    x, y = synthetic_data(3, seed=1)
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.float64)
        obj = deviated_model(bind_index(model, jnp.arange(3)), n_dev=3, lam=1.0)
        key = jax.random.key(4)

        @jax.jit
        def total(x):
            logits, aux = obj.logits_and_aux(x, key)
            return jnp.sum(cross_entropy(logits, y) + aux), jnp.sum(aux)

        grad, aux = jax.jit(jax.grad(total, has_aux=True))(x)
        assert float(aux) > 0
        h = 1e-5
        d = jax.random.normal(jax.random.key(10), (2, *x.shape), jnp.float64)
        fd = jax.vmap(lambda d: (total(x + h * d)[0] - total(x - h * d)[0]) / (2 * h))(d)
        np.testing.assert_allclose(jnp.sum(grad * d, axis=(1, 2, 3, 4)), fd, rtol=1e-6)


def test_objective_logits_are_the_models_and_refusals():
    model = defended_mlp("exact")
    x, _ = synthetic_data(4, seed=1)
    bound = bind_index(model, jnp.arange(4) + 7)
    obj = deviated_model(bound, n_dev=2)
    assert obj.steps == (2, 5)
    key = jax.random.key(0)
    want, logits, (logits_aux, _) = jax.jit(
        lambda o, b, x: (b(x, key), o(x, key), o.logits_and_aux(x, key))
    )(obj, bound, x)
    np.testing.assert_allclose(logits, want, rtol=1e-6)
    np.testing.assert_allclose(logits_aux, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use exact"):
        DeviatedReconstruction(bind_index(model.replace(grad="bpda"), jnp.arange(4)), (1,))
    with pytest.raises(ValueError, match="purified model"):
        deviated_model(bind_index(model.classifier, jnp.arange(4)))
    with pytest.raises(ValueError, match="APGD attacks only"):
        diffattack_suite(THREAT, autoattack_config("standard"))


def _evaluation(suite, batch_size=8):
    return Evaluation(attack=suite, threat=THREAT, batch_size=batch_size, seed=3)


class _Shifted(AuxObjective):
    """A cheap AuxObjective: a noisy MLP whose objective adds c * sum(x) per example."""

    model: NoisyModel
    c: float

    def __call__(self, x, key):
        return self.model(x, key)

    def logits_and_aux(self, x, key):
        return self.model(x, key), self.c * jnp.sum(x, axis=(1, 2, 3))


def test_apgd_maximises_loss_plus_aux():
    """APGD on an AuxObjective: aux = 0 is APGD on the logits, point for point; a large aux
    term (brightness) changes the points it finds."""
    x, y = synthetic_data(6, seed=2)
    model = NoisyModel(trained_mlp(), scale=0.5)
    key = jax.random.key(0)
    kw = dict(threat=THREAT, n_iter=5, n_eot=2)
    plain = apgd(model, x, y, key, **kw)
    zero = apgd(_Shifted(model, 0.0), x, y, key, **kw)
    np.testing.assert_array_equal(zero.x_adv, plain.x_adv)
    np.testing.assert_array_equal(zero.fooled, plain.fooled)
    bright = apgd(_Shifted(model, 1e3), x, y, key, **kw)
    assert not np.array_equal(bright.x_adv, plain.x_adv)  # the aux term steers the iterates


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
