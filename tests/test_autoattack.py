"""The AutoAttack suite: versions, bookkeeping, and at least as strong as each of its parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NoisyModel, synthetic_data, trained_mlp

from diffpure_jax.attacks.autoattack import autoattack, autoattack_config
from diffpure_jax.attacks.base import Threat, in_threat


def restarts(config):
    return config.n_restarts, config.fab_restarts


def test_versions():
    assert autoattack_config("standard").attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    rand = autoattack_config("rand")
    assert rand.attacks == ("apgd-ce", "apgd-dlr") and rand.n_eot == 20
    l1 = autoattack_config("standard", "L1")
    assert l1.attacks == ("apgd-ce", "apgd-t") and l1.use_largereps and l1.n_restarts == 5
    assert autoattack_config("custom", attacks=["square"]).attacks == ("square",)
    # Restarts (APGD-CE/APGD-DLR, untargeted FAB): `custom` keeps the reference constructor's 5,
    # its set_version('standard'/'rand') sets 1 (5 for APGD at L1).
    assert restarts(autoattack_config("custom", attacks=["apgd-ce", "fab"])) == (5, 5)
    assert restarts(autoattack_config("custom", "L2", attacks=["apgd-dlr"])) == (5, 5)
    assert restarts(autoattack_config("standard")) == (1, 1)
    assert restarts(autoattack_config("standard", "L2")) == (1, 1)
    assert restarts(l1) == (5, 1)
    assert restarts(rand) == (1, 1)
    assert restarts(autoattack_config("liu")) == (1, 1)
    custom = autoattack_config("custom", attacks=["fab"], n_restarts=2, fab_restarts=3)
    assert restarts(custom) == (2, 3)
    assert restarts(autoattack_config("rand", n_restarts=4)) == (4, 1)
    with pytest.raises(ValueError, match="fab_restarts must be at least 1"):
        autoattack_config("standard", fab_restarts=0)
    with pytest.raises(ValueError, match="needs attacks"):
        autoattack_config("custom")
    with pytest.raises(ValueError, match="unknown"):
        autoattack_config("custom", attacks=["pgd"])


def test_standard_is_at_least_as_strong_as_each_part():
    model = trained_mlp()
    x, y = synthetic_data(64, seed=11)
    threat = Threat("Linf", 0.08)
    key = jax.random.key(0)
    # The parts with the suite's settings (custom's own would be 5 restarts, not standard's 1).
    small = dict(n_iter=20, n_queries=300, n_target_classes=3, n_restarts=1, fab_restarts=1)

    def robust(config):
        result = autoattack(model, x, y, key, threat=threat, config=config)
        assert bool(jnp.all(in_threat(result.x_adv, x, threat)))
        # Robustness only ever decreases along the suite; broken points are misclassified.
        assert bool(jnp.all(result.robust[1:] <= result.robust[:-1]))
        broken = ~result.robust[-1]
        wrong = jnp.argmax(model(result.x_adv), -1) != y
        assert bool(jnp.all(wrong | ~broken))
        return float(result.robust[-1].mean())

    suite = robust(autoattack_config("standard", **small))
    parts = {a: robust(autoattack_config("custom", attacks=[a], **small)) for a in
             ("apgd-ce", "apgd-t", "fab-t", "square")}  # fmt: skip
    clean = float((jnp.argmax(model(x), -1) == y).mean())
    assert suite <= min(parts.values()) and min(parts.values()) < clean, (suite, parts, clean)


def test_rand_version_with_eot_on_a_random_model():
    model = NoisyModel(trained_mlp(), scale=0.5)
    x, y = synthetic_data(16, seed=3)
    threat = Threat("L2", 0.5)
    config = autoattack_config("rand", n_iter=10, n_eot=4)
    result = autoattack(model, x, y, jax.random.key(1), threat=threat, config=config)
    assert result.preds.shape == (2, 16) and result.robust.shape == (2, 16)
    assert bool(jnp.all(in_threat(result.x_adv, x, threat)))
    assert np.isfinite(np.asarray(result.x_adv)).all()


def test_custom_fab_runs_the_reference_restarts():
    """`custom`'s untargeted FAB runs 5 restarts (the later ones from random starts) unless told
    otherwise: at x the masked model's gradient is zero, so one restart breaks nothing."""
    mlp = trained_mlp()
    x, y = synthetic_data(16, seed=3)
    eps = 0.15
    threat = Threat("Linf", eps)

    def masked(xx, key):
        return mlp(x + (xx - x) ** 3 / eps**2, key)

    def broken(**overrides):
        config = autoattack_config("custom", attacks=["fab"], n_iter=20, **overrides)
        result = autoattack(masked, x, y, jax.random.key(0), threat=threat, config=config)
        assert bool(jnp.all(in_threat(result.x_adv, x, threat)))
        return int((~result.robust[-1]).sum())

    assert broken(fab_restarts=1) == 0
    assert broken() > 8
