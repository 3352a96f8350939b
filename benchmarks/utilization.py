"""FLOPs per purification and per exact gradient (XLA cost analysis), achieved FLOP/s, and the
ratio to a large float32 matmul measured in the same run on the same device.

XLA's cost analysis counts a while loop's body ONCE, whatever its trip count (checked here: the
compiled `purify` reports the same FLOPs for any number of steps). So FLOPs are counted per
network call and multiplied out:

* F_net: one score-network forward on the batch (cost analysis of the network alone);
* F_vjp: one network forward + VJP in x (cost analysis of `jax.grad` of the network alone);
* purification = n_steps x F_net (checked against a fully unrolled lax.scan Euler loop, whose
  cost analysis has no loop);
* exact gradient = n_steps x (F_net + F_vjp) + recomputation: the primal solve, then per step a
  recomputed forward and its VJP in the backward pass (diffrax's RecursiveCheckpointAdjoint also
  re-runs some forward steps between its checkpoints: `recompute_forward_steps`, counted by
  running the checkpointed loop with a counter, is added).

Achieved FLOP/s = FLOPs / measured time. The utilisation ratio = achieved FLOP/s / the FLOP/s of a
float32 matmul of --matmul-size (default 2048, 2 n^3 FLOPs), measured in the same process.

    python -m benchmarks.utilization
    python -m benchmarks.utilization --models full --batch 1 --t-star-full 0.005

Results: benchmarks/README.md.
"""

from __future__ import annotations

import os

# Before equinox/diffrax are imported (benchmark hygiene, see common.py).
os.environ["EQX_ON_ERROR"] = "nan"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import PurifyConfig  # noqa: E402

DEFAULT_OUT = common.RESULTS / "utilization.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small,full")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--t-star-small", type=float, default=0.01)
    p.add_argument("--t-star-full", type=float, default=0.005)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--unrolled-check-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=20.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def matmul_flops_per_s(n: int, repeats: int) -> dict:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    r = common.measure(lambda a, b: a @ b, (a, b), max(repeats, 5), 30.0)
    flops = 2.0 * n**3
    return {
        "n": n,
        "flops": flops,
        "cost_analysis_flops": r["xla_cost"].get("flops"),
        "steady_s": r["steady_s"],
        "flops_per_s": flops / r["steady_s"],
        "others_cpu_per_wall": r["others_cpu_per_wall"],
        "cpu_per_wall": r["cpu_per_wall"],
    }


def recompute_count(config: PurifyConfig) -> int:
    """Forward steps diffrax's checkpointed exact gradient runs in total (primal + recomputation),
    counted with a host callback on a cheap analytic score (same solver, same schedule)."""
    from diffpure_jax.purify import purify
    from diffpure_jax.score import ScoreModel
    from diffpure_jax.sde import VPSDE

    calls = []

    def score_fn(p, x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x * p

    score = ScoreModel(jnp.asarray(1.0), score_fn, VPSDE(), (2, 2, 1))
    x = jnp.full((1, 2, 2, 1), 0.5)

    def loss(x):
        return jnp.sum(purify(score, config, x, jax.random.key(0)))

    jax.block_until_ready(jax.jit(jax.grad(loss))(x))
    # Each step calls the score once in a forward evaluation and once more inside its VJP.
    return len(calls)


def analyse(model: str, args) -> dict:
    score = common.random_score(model)
    t_star = args.t_star_small if model == "small" else args.t_star_full
    config = PurifyConfig(t_star=t_star, dt=args.dt)
    n = config.n_steps
    x, w, key = common.inputs(args.batch)
    t = jnp.full((args.batch,), 0.05)
    f_net = common.measure(lambda s, y: s(y, t), (score, 2 * x - 1), args.repeats, args.budget_s)
    f_vjp = common.measure(
        jax.grad(lambda y, s, w: jnp.sum(w * s(y, t))), (2 * x - 1, score, w), 2, args.budget_s
    )
    fwd = common.measure(common.purify_fn(config), (score, x, key), args.repeats, args.budget_s)
    grad = common.measure(common.grad_fn(config), (x, score, w, key), 2, args.budget_s)
    # Cross-check of "cost analysis counts loop bodies once": an unrolled scan has no loop.
    k = args.unrolled_check_steps
    cfg_k = PurifyConfig(t_star=k * args.dt, dt=args.dt)
    unrolled, _ = common.compile_fn(
        lambda s, x, key: common.scan_purify(s, cfg_k, x, key, remat=False, unroll=True),
        (score, x, key),
    )
    unrolled_flops = common.cost_analysis(unrolled).get("flops")
    del unrolled
    net = f_net["xla_cost"]["flops"]
    vjp = f_vjp["xla_cost"]["flops"]
    calls = recompute_count(config)  # score calls in a checkpointed exact gradient
    # calls = n (primal) + recomputed forward steps + n (one per VJP'd step, which re-runs the
    # step's forward inside jax.vjp): extra forward steps = calls - 2 n.
    recompute = max(0, calls - 2 * n)
    purify_flops = n * net
    grad_flops = n * (net + vjp) + recompute * net
    out = {
        "model": model,
        "n_params": common.n_params(score.variables),
        "batch": args.batch,
        "n_steps": n,
        "t_star": t_star,
        "net_flops": net,
        "net_vjp_flops": vjp,
        "net_s": f_net["steady_s"],
        "net_vjp_s": f_vjp["steady_s"],
        "purify_cost_analysis_flops_as_compiled": fwd["xla_cost"].get("flops"),
        "grad_cost_analysis_flops_as_compiled": grad["xla_cost"].get("flops"),
        "unrolled_scan_steps": k,
        "unrolled_scan_flops": unrolled_flops,
        "unrolled_scan_flops_over_k_net": None
        if unrolled_flops is None
        else unrolled_flops / (k * net),
        "score_calls_in_exact_grad": calls,
        "recompute_forward_steps": recompute,
        "purify_flops": purify_flops,
        "grad_flops": grad_flops,
        "purify_flops_per_image_step": purify_flops / (n * args.batch),
        "grad_flops_per_image_step": grad_flops / (n * args.batch),
        "purify_s": fwd["steady_s"],
        "grad_s": grad["steady_s"],
        "purify_flops_per_s": purify_flops / fwd["steady_s"],
        "grad_flops_per_s": grad_flops / grad["steady_s"],
        "net_flops_per_s": net / f_net["steady_s"],
        "net_vjp_flops_per_s": vjp / f_vjp["steady_s"],
        "others_cpu_per_wall": {
            "net": f_net["others_cpu_per_wall"],
            "vjp": f_vjp["others_cpu_per_wall"],
            "purify": fwd["others_cpu_per_wall"],
            "grad": grad["others_cpu_per_wall"],
        },
        "cpu_per_wall": {"purify": fwd["cpu_per_wall"], "grad": grad["cpu_per_wall"]},
        "compile_s": {"purify": fwd["compile_s"], "grad": grad["compile_s"]},
    }
    return out


def table(rows_in, mm) -> str:
    rows = []
    peak = mm["flops_per_s"]
    for r in rows_in:
        for what, flops, secs in (
            ("network forward", r["net_flops"], r["net_s"]),
            ("network forward+VJP", r["net_vjp_flops"], r["net_vjp_s"]),
            ("purification", r["purify_flops"], r["purify_s"]),
            ("exact gradient", r["grad_flops"], r["grad_s"]),
        ):
            rows.append(
                [
                    r["model"],
                    r["batch"],
                    what,
                    r["n_steps"] if what in ("purification", "exact gradient") else 1,
                    f"{flops / 1e9:.2f}",
                    f"{secs * 1e3:.1f}",
                    f"{flops / secs / 1e9:.1f}",
                    f"{flops / secs / peak:.3f}",
                ]
            )
    return common.markdown_table(
        ["model", "batch", "what", "steps", "GFLOP", "time (ms)", "GFLOP/s", "/ matmul"], rows
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("utilization", config)
    start = time.perf_counter()
    mm = matmul_flops_per_s(args.matmul_size, args.repeats)
    print(
        f"matmul {args.matmul_size}^2 float32: {mm['steady_s'] * 1e3:.1f} ms, "
        f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    results = []
    for model in args.models.split(","):
        r = analyse(model, args)
        r["purify_ratio_to_matmul"] = r["purify_flops_per_s"] / mm["flops_per_s"]
        r["grad_ratio_to_matmul"] = r["grad_flops_per_s"] / mm["flops_per_s"]
        results.append(r)
        print(
            f"[{time.perf_counter() - start:6.0f} s] {model}: net {r['net_flops'] / 1e9:.2f} "
            f"GFLOP, purify {r['purify_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"(ratio {r['purify_ratio_to_matmul']:.3f}), grad {r['grad_flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s (ratio {r['grad_ratio_to_matmul']:.3f}); as compiled, cost analysis says "
            f"{r['purify_cost_analysis_flops_as_compiled'] / 1e9:.2f} GFLOP for "
            f"{r['n_steps']} steps; unrolled {r['unrolled_scan_steps']}-step scan / "
            f"(k F_net) = {r['unrolled_scan_flops_over_k_net']:.3f}",
            flush=True,
        )
    # A matmul measured again at the end, to see whether the machine's load changed.
    mm_end = matmul_flops_per_s(args.matmul_size, args.repeats)
    total = time.perf_counter() - start
    print()
    print(table(results, mm))
    print(f"matmul at the end: {mm_end['flops_per_s'] / 1e9:.1f} GFLOP/s; total {total:.0f} s")
    common.write_json(
        args.out,
        {
            "environment": env,
            "config": config,
            "command": common.command("benchmarks.utilization", argv),
            "matmul": mm,
            "matmul_end": mm_end,
            "results": results,
            "table": table(results, mm),
            "total_s": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
