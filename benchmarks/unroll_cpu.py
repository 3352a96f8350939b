"""Exact gradient of a short purification: diffrax loop (RecursiveCheckpointAdjoint) against
`PurifyConfig(unroll=True)` (straight-line Euler steps, each rematerialised), on CPU.

    python -m benchmarks.unroll_cpu [--score checkpoints/fmnist-ncsnpp-small] [--batch 32]

Prints and writes benchmarks/results/unroll_cpu.json: compile and run seconds of the jitted
gradient of <purify(x), w> in both forms, and their relative difference (must be ~1e-7).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from diffpure_jax import load_purifier


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--score", default="checkpoints/fmnist-ncsnpp-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=0.01)
    p.add_argument("--out", default="benchmarks/results/unroll_cpu.json")
    args = p.parse_args(argv)
    loop = load_purifier(args.score, t_star=args.t_star, dt=args.dt, grad="exact")
    shape = loop.score.image_shape
    x = jax.random.uniform(jax.random.key(0), (args.batch, *shape))
    w = jax.random.normal(jax.random.key(1), x.shape)
    key = jax.random.key(2)
    results, grads = {}, {}
    for name, purifier in (("loop", loop), ("unroll", loop.replace(unroll=True))):
        grad = jax.jit(jax.grad(lambda x, m: jnp.sum(m(x, key) * w)))
        t0 = time.perf_counter()
        compiled = grad.lower(x, purifier).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(x, purifier))
        t0 = time.perf_counter()
        grads[name] = jax.block_until_ready(compiled(x, purifier))
        run_s = time.perf_counter() - t0
        results[name] = {"compile_s": round(compile_s, 2), "run_s": round(run_s, 3)}
        print(name, results[name])
    rel = jnp.linalg.norm(grads["unroll"] - grads["loop"]) / jnp.linalg.norm(grads["loop"])
    out = {
        "settings": {**vars(args), "n_steps": loop.config.n_steps},
        "config": dataclasses.asdict(loop.config),
        "results": results,
        "speedup": round(results["loop"]["run_s"] / results["unroll"]["run_s"], 2),
        "relative_gradient_difference": float(rel),
        "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
