"""Self-check of the purifier and its gradient modes on this machine.

    python -m experiments.purify_check                      # random tiny NCSN++, 8x8 images
    python -m experiments.purify_check --score checkpoints/cifar10-ddpmpp-deep-cont --batch 8

Purifies a batch of random images, then for every gradient mode computes d/dx of a fixed linear
functional of the purified batch and compares it with the exact gradient and with a central finite
difference along a random direction. Prints a table with timings. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from diffpure_jax import GRAD_MODES, PurifyConfig, load_score_model, purify
from diffpure_jax.models.ncsnpp import tiny_score_model


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--score", help="score checkpoint directory (default: random tiny NCSN++, nf 16)"
    )
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--t-star", type=float, default=0.1)
    parser.add_argument("--dt", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.score:
        score = load_score_model(args.score)
    else:
        score = tiny_score_model(args.image_size, nf=16)
    key = jax.random.key(args.seed)
    kx, kw, kd, kn = jax.random.split(key, 4)
    x = jax.random.uniform(kx, (args.batch, *score.image_shape), minval=0.1, maxval=0.9)
    w = jax.random.normal(kw, x.shape)
    direction = jax.random.normal(kd, x.shape)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {x.shape}")
    print(f"t*={args.t_star}, dt={args.dt} ({round(args.t_star / args.dt)} steps)")

    def loss(s, config, x):
        return jnp.sum(w * purify(s, config, x, kn))

    base = PurifyConfig(t_star=args.t_star, dt=args.dt)
    forward = jax.jit(lambda s, x: loss(s, base, x))
    value, t_fwd = timed(forward, score, x)
    _, t_fwd2 = timed(forward, score, x)
    h = 1e-2
    fd = (forward(score, x + h * direction) - forward(score, x - h * direction)) / (2 * h)
    print(f"forward: {t_fwd:.2f} s first call, {t_fwd2:.3f} s after; loss {float(value):.4f}")
    mode, t1, t2, diff, deriv = "mode", "first s", "then s", "rel. diff to exact", "dir. deriv"
    print(f"{mode:8s} {t1:>8s} {t2:>8s} {diff:>19s} {deriv:>11s}")
    exact = None
    for mode in GRAD_MODES:
        config = PurifyConfig(t_star=args.t_star, dt=args.dt, grad=mode)
        grad = jax.jit(jax.grad(lambda x, s, c=config: loss(s, c, x)))
        g, t1 = timed(grad, x, score)
        _, t2 = timed(grad, x, score)
        exact = g if mode == "exact" else exact
        diff = float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
        print(f"{mode:8s} {t1:8.2f} {t2:8.3f} {diff:19.4g} {float(jnp.sum(g * direction)):11.4f}")
    print(f"{'fin.diff':8s} {'':8s} {'':8s} {'':19s} {float(fd):11.4f}  (float32, h={h})")


if __name__ == "__main__":
    main()
