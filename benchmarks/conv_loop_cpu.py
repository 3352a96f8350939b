"""Input gradients of convolutions inside a while loop on XLA:CPU: lax's own transpose against
`diffpure_jax.models.conv` (jax-ml/jax#12868), then the whole DiffPure gradient inside a loop.

    python -m benchmarks.conv_loop_cpu [--score checkpoints/fmnist-ncsnpp-small] [--batch 8]

Part 1 (one 3x3 convolution layer pair, 16x28x28x32): seconds per input gradient, alone and inside
a `fori_loop`, for `lax.conv_general_dilated` and for ours. Part 2 (the shipped Fashion-MNIST
DiffPure, t* = 0.1, 5 Euler steps, EOT 2, exact gradients): seconds per gradient alone and per
iteration of a sign-step loop, as APGD runs it. Writes benchmarks/results/conv_loop_cpu.json.

Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from diffpure_jax import DefendedClassifier, load_classifier, load_purifier
from diffpure_jax.attacks.base import eot_value_and_grad
from diffpure_jax.models.conv import conv_general_dilated

LOOP_ITERATIONS = 4


def _seconds(fn, *args, per=1, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return round((time.perf_counter() - t0) / repeats / per, 4)


def _alone_and_in_loop(grad_fn, x, model):
    """Seconds per call of grad_fn(model, x) (an input gradient): alone, and per iteration of a
    sign-step loop. The model is an argument (a pytree of arrays), as in the attacks."""
    grad = eqx.filter_jit(grad_fn)

    @eqx.filter_jit
    def loop(model, x):
        def step(i, v):
            return jnp.clip(v + 1e-3 * jnp.sign(grad_fn(model, v)), 0.0, 1.0)

        return lax.fori_loop(0, LOOP_ITERATIONS, step, x)

    return {
        "alone_s": _seconds(grad, model, x),
        "in_loop_s": _seconds(loop, model, x, per=LOOP_ITERATIONS),
    }


def _two_layers(conv):
    def loss(w, v):
        c = lambda u: conv(u, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
        return jnp.sum(jnp.tanh(c(jnp.tanh(c(v)))))

    return jax.grad(loss, argnums=1)


def layer_benchmark() -> dict:
    x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.05
    out = {}
    for name, conv in (("lax", lax.conv_general_dilated), ("ours", conv_general_dilated)):
        out[name] = _alone_and_in_loop(_two_layers(conv), x, w)
        print("layer", name, out[name], flush=True)
    return out


def _eot_ce_grad(y, key, n_eot=2):
    """(model, x) -> the gradient of the EOT-mean cross-entropy of model(x, key) (APGD-CE's)."""

    def grad(model, v):
        def ce(v, k):
            logits = model(v, k)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0], logits

        return eot_value_and_grad(ce, v, key, n_eot)[1]

    return grad


def diffpure_benchmark(args) -> dict:
    purifier = load_purifier(args.score, t_star=0.1, dt=args.dt, grad="exact")
    model = DefendedClassifier(purifier, load_classifier(args.classifier))
    x = jax.random.uniform(jax.random.key(0), (args.batch, *purifier.score.image_shape))
    y = jnp.arange(args.batch) % 10
    out = {}
    for name, unroll in (("loop", False), ("unroll", True)):
        grad = _eot_ce_grad(y, jax.random.key(1))
        out[name] = _alone_and_in_loop(grad, x, model.replace(unroll=unroll))
        print("diffpure", name, out[name], flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--score", default="checkpoints/fmnist-ncsnpp-small")
    p.add_argument("--classifier", default="checkpoints/fmnist-wrn-16-1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dt", type=float, default=0.02)
    p.add_argument("--out", default="benchmarks/results/conv_loop_cpu.json")
    args = p.parse_args(argv)
    result = {
        "settings": vars(args),
        "layer": layer_benchmark(),
        "diffpure_exact_eot2": diffpure_benchmark(args),
        "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
