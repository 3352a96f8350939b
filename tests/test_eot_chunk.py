"""EOT in chunks (`eot_chunk`): the same draws and results as one vmapped call, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NoisyModel, refusal, synthetic_data, trained_mlp

from diffpure_jax.attacks import base
from diffpure_jax.attacks.apgd import apgd
from diffpure_jax.attacks.autoattack import LIU_PROTOCOLS, AutoAttackConfig, autoattack_config
from diffpure_jax.attacks.base import Threat, eot_logits, eot_value_and_grad
from diffpure_jax.attacks.losses import cross_entropy
from diffpure_jax.attacks.pgd import pgd
from experiments import cifar_autoattack
from experiments.config import identity

N = 8
TOL = dict(rtol=1e-5, atol=1e-6)


def _problem():
    model = NoisyModel(trained_mlp(), scale=0.5)
    x, y = synthetic_data(6, seed=2)
    return model, x, y


def _old_eot_value_and_grad(loss_fn, x, key, n_eot):
    """The unchunked code path as it was: one vmapped call of every draw."""

    def one(k):
        def total(x):
            loss, logits = loss_fn(x, k)
            return jnp.sum(loss), (loss, logits)

        grad, (loss, logits) = jax.grad(total, has_aux=True)(x)
        return loss, grad, logits

    loss, grad, logits = jax.vmap(one)(base.eot_keys(key, n_eot))
    return loss.mean(0), grad.mean(0), logits.mean(0)


def test_chunked_equals_unchunked():
    model, x, y = _problem()
    key = jax.random.key(3)

    def loss_fn(xx, k):
        z = model(xx, k)
        return cross_entropy(z, y), z

    def outputs(chunk, old=False):
        """(loss, grad, mean logits) of eot_value_and_grad, eot_logits' (N, B, K) logits and
        the gradient through them (PGD's loss on their mean), in one compiled program."""

        def draws(x, k):
            if old:
                return jax.vmap(lambda kk: model(x, kk))(base.eot_keys(k, N))
            return eot_logits(model, x, k, N, chunk)

        def through(x, k):
            return jnp.sum(cross_entropy(draws(x, k).mean(0), y))

        @jax.jit
        def f(x, k):
            if old:
                vg = _old_eot_value_and_grad(loss_fn, x, k, N)
            else:
                vg = eot_value_and_grad(loss_fn, x, k, N, chunk)
            return (*vg, draws(x, k), jax.grad(through)(x, k))

        return f(x, key)

    ref = outputs(None)
    # chunk=None (and so a chunk covering every draw) is today's program, bit for bit.
    for a, b in zip(ref, outputs(None, old=True), strict=True):
        np.testing.assert_array_equal(a, b)
    assert base.check_eot_chunk(N, N) is None and base.check_eot_chunk(N + 3, N) is None
    # Draw d is eot_keys(key, N)[d] in every chunking, with or without a remainder chunk.
    diffs = []
    for chunk in (1, 2, 3, 4, 8):
        for a, b in zip(outputs(chunk), ref, strict=True):
            np.testing.assert_allclose(a, b, **TOL)
            diffs.append(float(jnp.max(jnp.abs(a - b))))
    print(f"max |chunked - unchunked|: {max(diffs):.2e}")
    # One draw keeps its fast path; bad chunks are refused.
    np.testing.assert_array_equal(eot_logits(model, x, key, 1, 4)[0], model(x, key))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="eot_chunk must be a positive int"):
            eot_value_and_grad(loss_fn, x, key, N, bad)
        with pytest.raises(ValueError, match="eot_chunk must be a positive int"):
            eot_logits(model, x, key, N, bad)


def test_attacks_chunked_equal_unchunked():
    model, x, y = _problem()
    threat = Threat("Linf", 0.1)
    key = jax.random.key(4)
    a = apgd(model, x, y, key, threat=threat, n_iter=5, n_eot=4)
    b = apgd(model, x, y, key, threat=threat, n_iter=5, n_eot=4, eot_chunk=2)
    np.testing.assert_allclose(b.x_adv, a.x_adv, **TOL)
    np.testing.assert_array_equal(b.fooled, a.fooled)
    kw = dict(threat=threat, n_iter=4, n_eot=4, recheck_draws=3)
    p = pgd(model, x, y, key, **kw)
    q = pgd(model, x, y, key, **kw, eot_chunk=2)  # also chunks the 3 re-check draws: 2 + 1
    np.testing.assert_allclose(q.x_adv, p.x_adv, **TOL)
    np.testing.assert_array_equal(q.fooled, p.fooled)
    print(
        f"max |x_adv chunked - unchunked|: apgd {float(jnp.max(jnp.abs(a.x_adv - b.x_adv))):.1e}, "
        f"pgd {float(jnp.max(jnp.abs(p.x_adv - q.x_adv))):.1e}"
    )
    with pytest.raises(ValueError, match="eot_chunk"):
        apgd(model, x, y, key, threat=threat, n_iter=5, n_eot=4, eot_chunk=0)
    with pytest.raises(ValueError, match="eot_chunk"):
        pgd(model, x, y, key, **kw, eot_chunk=0)


def test_chunks_bound_the_compiled_memory():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 8)) * 0.1

    def logits_fn(x, key):  # a sizeable activation: 16 x 32 x 32 x 8 per draw
        h = jnp.tanh(x + 0.1 * jax.random.normal(key, x.shape))
        dims = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=dims)
        return jnp.tanh(h).mean((1, 2))

    def loss_fn(x, key):
        z = logits_fn(x, key)
        return jax.nn.logsumexp(z, -1) - z[:, 0], z

    x = jax.ShapeDtypeStruct((16, 32, 32, 8), jnp.float32)
    key = jax.random.key(1)

    def temp(f):
        return jax.jit(f).lower(x, key).compile().memory_analysis().temp_size_in_bytes

    def vg(c):
        return temp(lambda x, k: eot_value_and_grad(loss_fn, x, k, 32, c))

    def through(c):  # a gradient through chunked logits (PGD): remat keeps it bounded too
        return temp(lambda x, k: jax.grad(lambda x: eot_logits(logits_fn, x, k, 32, c).sum())(x))

    ratios = vg(4) / vg(None), through(4) / through(None)
    print(f"compiled temp memory, chunk 4 / unchunked at EOT 32: {ratios[0]:.3f}, {ratios[1]:.3f}")
    assert ratios[0] < 0.5 and ratios[1] < 0.5, ratios


def test_liu_preset_and_the_flag(capsys):
    liu = autoattack_config("liu")
    assert (liu.attacks, liu.n_iter, liu.n_eot, liu.n_restarts) == (("apgd-ce",), 20, 10, 1)
    assert autoattack_config("liu", eot_chunk=5).eot_chunk == 5
    with pytest.raises(ValueError, match="eot_chunk"):
        AutoAttackConfig(eot_chunk=0)
    assert LIU_PROTOCOLS == ("one_draw", "worst_of_20", "majority_of_20", "average_of_20")

    run = cifar_autoattack.get_run(["--version", "liu", "--grad", "exact", "--eot-chunk", "5"])
    assert (run.version, run.grad, run.eot_chunk) == ("liu", "exact", 5)
    assert run.protocols == LIU_PROTOCOLS  # the preset's own, unless others are given
    mine = cifar_autoattack.get_run(["--version", "liu", "--protocols", "worst_of_5"])
    assert mine.protocols == ("worst_of_5",)
    assert cifar_autoattack.get_run([]).eot_chunk is None
    assert cifar_autoattack.get_run(["--version", "rand"]).protocols == ("one_draw",)
    # A memory setting: not part of the run's identity (same workdir, resumable).
    same = cifar_autoattack.get_run(["--version", "liu", "--grad", "exact"])
    assert identity(run) == identity(same) and "eot_chunk" not in identity(run)
    for argv in (["--attack", "pgd-eot-final"], ["--attack", "bpda-eot"], ["--norm", "StAdv"]):
        assert callable(cifar_autoattack.get_run([*argv, "--eot-chunk", "4"]).suite())
    for argv, message in [
        (["--eot-chunk", "0"], "--eot-chunk must be at least 1"),
        (["--eot-chunk", "-3"], "--eot-chunk must be at least 1"),
        (["--eot-chunk", "x"], "invalid"),
        (["--version", "liu2"], "invalid choice"),
    ]:
        assert message in refusal(capsys, cifar_autoattack.get_run, argv), argv
