"""models.norm.GroupNorm against flax's nn.GroupNorm (two-pass variance): the same values from
sums taken in another order, the same parameters, float32 and bfloat16 inputs; its gradients
against flax's and against finite differences (float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffpure_jax.models.norm import GroupNorm, group_norm


@pytest.mark.parametrize(
    "shape, groups", [((2, 8, 8, 16), 4), ((3, 4, 4, 64), 32), ((2, 5, 7, 32), 32), ((2, 9, 6), 3)]
)
def test_group_norm_equals_flax(shape, groups):
    kx, ks, kb = jax.random.split(jax.random.key(0), 3)
    # An offset mean and an uneven scale, so that a one-pass variance would lose digits.
    x = 3.0 + jax.random.normal(kx, shape) * jnp.linspace(0.1, 2.0, shape[-1])
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
    ours = GroupNorm(num_groups=groups, epsilon=1e-6)
    c = shape[-1]
    variables = {
        "params": {"scale": jax.random.normal(ks, (c,)), "bias": jax.random.normal(kb, (c,))}
    }
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )
    want, got = ref.apply(variables, x), ours.apply(variables, x)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    # bfloat16 inputs and parameters (as score.LowPrecisionScoreFn casts them): float32 statistics.
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    want16, got16 = ref.apply(low, x.astype(jnp.bfloat16)), ours.apply(low, x.astype(jnp.bfloat16))
    assert got16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got16, np.float32) - np.asarray(want16, np.float32))
    assert err.max() <= 2**-7 * (1 + np.abs(np.asarray(want16, np.float32)).max())


def test_group_norm_refuses_indivisible_channels():
    with pytest.raises(ValueError, match="12 channels are not divisible by 8 groups"):
        GroupNorm(num_groups=8).init(jax.random.key(0), jnp.ones((1, 2, 2, 12)))


@pytest.mark.parametrize("shape, groups", [((2, 4, 4, 16), 4), ((3, 5, 8), 2), ((2, 3, 3, 32), 32)])
def test_group_norm_gradients_equal_flax(shape, groups):
    kx, ks, kb, kg = jax.random.split(jax.random.key(2), 4)
    c = shape[-1]
    x = 1.5 + jax.random.normal(kx, shape) * jnp.linspace(0.2, 3.0, c)
    scale, bias = jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
    w = jax.random.normal(kg, shape)
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)

    def ours(x, scale, bias):
        return jnp.sum(w * group_norm(x, scale, bias, groups, 1e-6))

    def theirs(x, scale, bias):
        return jnp.sum(w * ref.apply({"params": {"scale": scale, "bias": bias}}, x))

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(theirs, argnums=(0, 1, 2)))(x, scale, bias)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=0, atol=2e-5 * (1 + np.abs(r).max())
        )
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        check_grads(lambda *a: group_norm(*a, groups, 1e-6), args, order=1, modes=["rev"])
