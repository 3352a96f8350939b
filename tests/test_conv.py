"""models/conv.py: the convolution with a loop-friendly input gradient equals lax's, values and
gradients, for every stride, padding and dilation the models could use; the models use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffpure_jax import models
from diffpure_jax.models.conv import conv_general_dilated
from diffpure_jax.models.ncsnpp import tiny_ncsnpp_kwargs

NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv, strides, padding, dilation, dn=NHWC, groups=1):
    def f(x, w):
        y = conv(
            x,
            w,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=dn,
            feature_group_count=groups,
        )
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    return f


PADDINGS = ["SAME", "VALID", ((1, 1), (1, 1)), ((0, 2), (2, 1))]
STRIDES = [(1, 1), (2, 2), (3, 2)]
# (spatial size, kernel size, strides, padding, kernel dilation)
CASES = [((8, 9), k, s, p, (1, 1)) for k in (1, 3, 4) for s in STRIDES for p in PADDINGS]
CASES += [((7, 7), 3, s, p, (2, 1)) for s in STRIDES for p in PADDINGS]


@pytest.mark.parametrize("size,k,strides,padding,dilation", CASES)
def test_values_and_gradients_equal_lax(size, k, strides, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, *size, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    ref_f = _loss(lax.conv_general_dilated, strides, padding, dilation)
    our_f = _loss(conv_general_dilated, strides, padding, dilation)
    ref_v, ref_g = jax.value_and_grad(ref_f, (0, 1))(x, w)
    our_v, our_g = jax.value_and_grad(our_f, (0, 1))(x, w)
    np.testing.assert_allclose(our_v, ref_v, rtol=1e-6, atol=1e-6)
    for ours, ref in zip(our_g, ref_g, strict=True):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_input_gradient_inside_a_loop_and_vmapped():
    """The custom VJP under fori_loop and vmap (as in APGD with EOT) equals lax's."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4)) * 0.3

    def run(conv):
        f = _loss(conv, (1, 1), "SAME", (1, 1))
        step = jax.vmap(jax.grad(f), in_axes=(0, None))
        return jax.jit(lambda x: lax.fori_loop(0, 3, lambda i, v: v + 0.1 * step(v, w), x))(x)

    np.testing.assert_allclose(
        run(conv_general_dilated), run(lax.conv_general_dilated), rtol=1e-5, atol=1e-5
    )


def test_other_layouts_and_groups_fall_back_to_lax():
    x = jax.random.normal(jax.random.key(0), (2, 4, 9, 9))
    w = jax.random.normal(jax.random.key(1), (6, 2, 3, 3))
    nchw = ("NCHW", "OIHW", "NCHW")
    for dn, groups in ((nchw, 1), (nchw, 2)):
        w_g = w if groups == 2 else jnp.concatenate([w, w], axis=1)
        ref = jax.grad(_loss(lax.conv_general_dilated, (2, 2), "SAME", (1, 1), dn, groups), (0, 1))
        ours = jax.grad(_loss(conv_general_dilated, (2, 2), "SAME", (1, 1), dn, groups), (0, 1))
        for a, b in zip(ours(x, w_g), ref(x, w_g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _conv_calls(jaxpr) -> tuple[int, int]:
    """(custom_vjp calls, bare conv_general_dilated) in a jaxpr, sub-jaxprs included."""
    custom = bare = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("custom_vjp_call"):
            custom += 1
            continue
        bare += name == "conv_general_dilated"
        for sub in _sub_jaxprs(eqn.params):
            c, b = _conv_calls(sub)
            custom, bare = custom + c, bare + b
    return custom, bare


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(getattr(v, "jaxpr", None), "eqns"):
                yield v.jaxpr


SMALL = {
    "wideresnet": {"depth": 10, "widen_factor": 1},
    "dm_wideresnet": {"depth": 10, "width": 1},
    "ncsnpp": tiny_ncsnpp_kwargs(8, num_channels=1, init_scale=0.0),
}


@pytest.mark.parametrize("architecture", sorted(SMALL))
def test_models_use_it(architecture):
    net = models.build_model(architecture, SMALL[architecture])
    if architecture == "ncsnpp":
        args = (jnp.zeros((1, 8, 8, 1)), jnp.full((1,), 0.5))
    else:
        args = (jnp.zeros((1, 32, 32, 3)),)
    variables = net.init(jax.random.key(0), *args)
    jaxpr = jax.make_jaxpr(lambda *a: net.apply(variables, *a))(*args).jaxpr
    custom, bare = _conv_calls(jaxpr)
    assert custom > 0 and bare == 0, (custom, bare)
