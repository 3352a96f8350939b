"""`conv_general_dilated`: lax's convolution, with an input gradient that stays fast in loops.

Drop-in for `jax.lax.conv_general_dilated` (Flax: `nn.Conv(..., conv_general_dilated=...)`).
Values and gradients are the same (tests/test_conv.py); only how the input gradient is computed
differs.

Why: JAX differentiates a convolution into another convolution whose kernel has its input and
output feature dimensions swapped (dimension numbers "OI" instead of "IO"). XLA:CPU runs that
form far slower inside a while loop than outside one (jax-ml/jax#12868), and every attack
iteration and every diffrax step is a while loop, so the slowdown hits every DiffPure gradient of
an attack. `benchmarks/conv_loop_cpu.py` measures it, for one layer pair and for the whole
DiffPure gradient, with and without this module (results: benchmarks/README.md).

Here the input gradient (for an NHWC input and an HWIO kernel) is computed explicitly in the
standard layout: the cotangent dilated by the strides (zeros between its entries) and padded, then
convolved ("VALID", stride 1) with the kernel flipped in space and transposed to HWIO, so XLA sees
an ordinary convolution everywhere. The kernel gradient is JAX's own (XLA removes it when unused,
as in attacks). Other layouts, feature groups and input dilation call lax unchanged.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class _Spec(NamedTuple):
    """The static arguments of one convolution (hashable: a custom_vjp nondiff argument)."""

    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: lax.ConvDimensionNumbers
    precision: object
    preferred_element_type: object


def _channels_last(ndim_spatial: int) -> tuple[str, str, str] | None:
    """("NHWC", "HWIO", "NHWC") for 2 spatial dimensions (1 to 3 supported), else None."""
    if not 1 <= ndim_spatial <= 3:
        return None
    spatial = "DHW"[-ndim_spatial:]
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _lax_conv(lhs, rhs, spec: _Spec):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        spec.strides,
        spec.pads,
        rhs_dilation=spec.rhs_dilation,
        dimension_numbers=spec.dimension_numbers,
        precision=spec.precision,
        preferred_element_type=spec.preferred_element_type,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs, rhs, spec: _Spec):
    return _lax_conv(lhs, rhs, spec)


def _conv_fwd(lhs, rhs, spec: _Spec):
    return _lax_conv(lhs, rhs, spec), (lhs, rhs)


def _input_grad(g, lhs_shape, rhs, spec: _Spec):
    """d(conv)/d(lhs) applied to the cotangent g: one channels-last, stride-1, VALID convolution."""
    n = len(spec.strides)
    kernel = rhs.shape[:n]
    config = [(0, 0, 0)]
    for i in range(n):
        k_dilated = (kernel[i] - 1) * spec.rhs_dilation[i] + 1
        out_dilated = (g.shape[1 + i] - 1) * spec.strides[i] + 1
        before = k_dilated - 1 - spec.pads[i][0]
        after = lhs_shape[1 + i] + k_dilated - 1 - out_dilated - before
        config.append((before, after, spec.strides[i] - 1))
    config.append((0, 0, 0))
    g_dilated = lax.pad(g, jnp.zeros((), g.dtype), config)
    flipped = jnp.flip(rhs, axis=tuple(range(n)))
    swapped = jnp.swapaxes(flipped, n, n + 1)  # (..., O, I): the transposed map's HWIO kernel
    return lax.conv_general_dilated(
        g_dilated,
        swapped.astype(g.dtype),
        (1,) * n,
        "VALID",
        rhs_dilation=spec.rhs_dilation,
        dimension_numbers=spec.dimension_numbers,
        precision=spec.precision,
    ).astype(g.dtype)


def _conv_bwd(spec: _Spec, residuals, g):
    lhs, rhs = residuals
    d_lhs = _input_grad(g, lhs.shape, rhs, spec).astype(lhs.dtype)
    _, rhs_vjp = jax.vjp(lambda r: _lax_conv(lhs, r, spec), rhs)
    (d_rhs,) = rhs_vjp(g)
    return d_lhs, d_rhs


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`jax.lax.conv_general_dilated` (same arguments, values and gradients); see the module."""
    n = lhs.ndim - 2
    layout = _channels_last(n)
    plain = (
        layout is not None
        and feature_group_count == 1
        and batch_group_count == 1
        and (lhs_dilation is None or all(d == 1 for d in lhs_dilation))
    )
    if plain:
        given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        standard = lax.conv_dimension_numbers(lhs.shape, rhs.shape, layout)
        plain = given == standard
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    rhs_dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation else (1,) * n
    if isinstance(padding, str):
        dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:n], rhs_dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:-1], dilated_kernel, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    spec = _Spec(strides, pads, rhs_dilation, standard, precision, preferred_element_type)
    return _conv(lhs, rhs, spec)
