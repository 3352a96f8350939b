"""The AutoAttack suite: versions, bookkeeping, and at least as strong as each of its parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NoisyModel, synthetic_data, trained_mlp

from diffpure_jax.attacks.autoattack import autoattack, autoattack_config
from diffpure_jax.attacks.base import Threat, in_threat


def test_versions():
    assert autoattack_config("standard").attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    rand = autoattack_config("rand")
    assert rand.attacks == ("apgd-ce", "apgd-dlr") and rand.n_eot == 20
    l1 = autoattack_config("standard", "L1")
    assert l1.attacks == ("apgd-ce", "apgd-t") and l1.use_largereps and l1.n_restarts == 5
    assert autoattack_config("custom", attacks=["square"]).attacks == ("square",)
    with pytest.raises(ValueError, match="needs attacks"):
        autoattack_config("custom")
    with pytest.raises(ValueError, match="unknown"):
        autoattack_config("custom", attacks=["pgd"])


def test_standard_is_at_least_as_strong_as_each_part():
    model = trained_mlp()
    x, y = synthetic_data(64, seed=11)
    threat = Threat("Linf", 0.08)
    key = jax.random.key(0)
    small = dict(n_iter=20, n_queries=300, n_target_classes=3)

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
