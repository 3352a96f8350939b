"""AutoAttack's guardrails (diffpure_jax.attacks.checks), alone and as `autoattack` runs them."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NoisyModel, synthetic_data, trained_mlp

from diffpure_jax.attacks.autoattack import autoattack, autoattack_config
from diffpure_jax.attacks.base import Threat
from diffpure_jax.attacks.checks import (
    PROBABILITIES_MESSAGE,
    RANDOMIZED_MESSAGE,
    check_randomized,
    check_range_output,
)

KEY = jax.random.key(0)
THREAT = Threat("Linf", 0.05)


class Softmax(eqx.Module):
    """A deterministic model that (wrongly) outputs probabilities."""

    model: eqx.Module

    def __call__(self, x, key=None):
        return jax.nn.softmax(self.model(x), axis=-1)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(8, seed=2)


def small(version):
    # One cheap attack, with the version's other settings (n_eot = 1 for standard, 20 for rand).
    return autoattack_config(version, attacks=("apgd-ce",), n_iter=2)


def check_messages(fn):
    """The guardrail messages that fn() warned with."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    ours = (RANDOMIZED_MESSAGE, PROBABILITIES_MESSAGE)
    return [str(w.message) for w in caught if str(w.message) in ours]


def test_deterministic_model_gives_no_warning(data):
    x, y = data
    model = trained_mlp()
    config = small("standard")
    messages = check_messages(lambda: autoattack(model, x, y, KEY, threat=THREAT, config=config))
    assert messages == []
    assert not check_randomized(model, x, KEY)
    assert not check_range_output(model(x))


def test_random_model_under_standard_warns(data):
    x, y = data
    model = NoisyModel(trained_mlp(), scale=0.5)
    with pytest.warns(UserWarning, match="use version='rand'"):
        autoattack(model, x, y, KEY, threat=THREAT, config=small("standard"))
    with pytest.warns(UserWarning, match="use version='rand'"):
        assert check_randomized(model, x, KEY)
    # checks=False skips them, and the results do not depend on them.
    config = small("standard")
    off = []
    assert check_messages(
        lambda: off.extend(autoattack(model, x, y, KEY, threat=THREAT, config=config, checks=False))
    ) == []  # fmt: skip
    with pytest.warns(UserWarning):
        on = autoattack(model, x, y, KEY, threat=THREAT, config=config)
    for a, b in zip(on, off, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_softmax_model_warns(data):
    x, y = data
    model = Softmax(trained_mlp())
    with pytest.warns(UserWarning, match="pass logits, not probabilities"):
        autoattack(model, x, y, KEY, threat=THREAT, config=small("standard"))
    with pytest.warns(UserWarning, match="pass logits"):
        assert check_range_output(model(x))
    # Logits that happen to lie in [0, 1] but do not sum to 1 are not probabilities.
    assert not check_range_output(0.5 * model(x))


def test_rand_on_a_random_model_does_not_warn_about_randomness(data):
    x, y = data
    model = NoisyModel(trained_mlp(), scale=0.5)
    config = autoattack_config("rand", n_iter=2, n_eot=2)
    messages = check_messages(lambda: autoattack(model, x, y, KEY, threat=THREAT, config=config))
    assert RANDOMIZED_MESSAGE not in messages


def test_checks_skip_traced_values(data):
    x, _ = data
    model, noisy = Softmax(trained_mlp()), NoisyModel(trained_mlp())

    @jax.jit
    def inside(x):
        assert not check_range_output(model(x))
        assert not check_randomized(noisy, x, KEY)
        return jnp.sum(x)

    assert check_messages(lambda: inside(x).block_until_ready()) == []
