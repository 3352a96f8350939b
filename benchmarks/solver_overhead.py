"""The diffrax solve (our `purify`) vs a minimal hand-written `lax.scan` Euler-Maruyama loop.

Same network, same time grid, same noise (`common.scan_purify` draws it with
`diffpure_jax.noise.example_keys / forward_noise / step_noise` exactly as `purify` does); the
outputs and the exact input gradients are asserted to agree (max abs difference <= --atol).

Cases, each compiled once, warmed up, min over repeats:

* forward: `purify` (diffrax) vs `scan_purify`;
* exact gradient: `purify` grad='exact' with diffrax's default checkpoints (equinox:
  floor(sqrt(2 n + 1/4) - 1/2) states) and with checkpoints = n_steps, vs the scan with
  `jax.checkpoint` on every step (stores the n states, recomputes each step's network once in
  the backward pass: the same schedule as checkpoints = n_steps), and vs the scan without any
  checkpointing (stores every step's activations);
* where the time goes: one network call, one network VJP alone, and n network VJPs in a rolled
  `lax.scan` (XLA:CPU runs the VJP inside a loop body several times slower than the same VJP
  outside one, which dominates both solvers' gradient time on CPU).

    python -m benchmarks.solver_overhead
    python -m benchmarks.solver_overhead --model full --batch 1 --t-star 0.005

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
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import PurifyConfig  # noqa: E402

DEFAULT_OUT = common.RESULTS / "solver_overhead.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=list(common.MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--t-star", type=float, default=0.02, help="20 steps at dt=1e-3")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def vjp_scan_fn(n: int):
    """n network VJPs (in x) in a rolled lax.scan, the unit of work of a solve's backward pass."""

    def f(score, y, w):
        t0 = jnp.full(y.shape[:1], 0.05)

        def body(y, k):
            _, vjp = jax.vjp(lambda y: score(y, t0 + 1e-4 * k), y)
            return y + 1e-3 * vjp(w)[0], None

        return jax.lax.scan(body, y, jnp.arange(n))[0]

    return f


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("solver_overhead", config)
    score = common.random_score(args.model)
    cfg = PurifyConfig(t_star=args.t_star, dt=args.dt)
    cfg_n = PurifyConfig(t_star=args.t_star, dt=args.dt, checkpoints=cfg.n_steps)
    n = cfg.n_steps
    x, w, key = common.inputs(args.batch)
    y = 2.0 * x - 1.0
    t = jnp.full((args.batch,), 0.05)

    cases = {
        "forward diffrax": (common.purify_fn(cfg), (score, x, key)),
        "forward scan": (lambda s, x, k: common.scan_purify(s, cfg, x, k), (score, x, key)),
        "exact grad diffrax (default checkpoints)": (common.grad_fn(cfg), (x, score, w, key)),
        "exact grad diffrax (checkpoints = n)": (common.grad_fn(cfg_n), (x, score, w, key)),
        "exact grad scan + checkpoint per step": (common.scan_grad_fn(cfg), (x, score, w, key)),
        "exact grad scan, no checkpoint": (
            common.scan_grad_fn(cfg, remat=False),
            (x, score, w, key),
        ),
        "network forward x1": (lambda s, y: s(y, t), (score, y)),
        "network VJP x1": (jax.grad(lambda y, s, w: jnp.sum(w * s(y, t))), (y, score, w)),
        f"network VJP x{n} in lax.scan": (vjp_scan_fn(n), (score, y, w)),
    }
    results, outputs = {}, {}
    start = time.perf_counter()
    for name, (fn, fargs) in cases.items():
        fargs = jax.block_until_ready(fargs)
        compiled, r = common.compile_fn(fn, fargs)
        outputs[name] = np.asarray(compiled(*fargs))
        r.update(common.time_compiled(compiled, fargs, args.repeats, args.budget_s))
        results[name] = r
        print(
            f"[{time.perf_counter() - start:6.0f} s] {name}: {r['steady_s'] * 1e3:.1f} ms "
            f"(compile {r['compile_s']:.1f} s, others {common.fmt_load(r)})",
            flush=True,
        )
        del compiled

    def max_diff(a, b):
        return float(np.abs(outputs[a] - outputs[b]).max())

    agreement = {
        "forward: diffrax vs scan": max_diff("forward diffrax", "forward scan"),
        "grad: diffrax default vs scan+checkpoint": max_diff(
            "exact grad diffrax (default checkpoints)", "exact grad scan + checkpoint per step"
        ),
        "grad: diffrax checkpoints=n vs scan+checkpoint": max_diff(
            "exact grad diffrax (checkpoints = n)", "exact grad scan + checkpoint per step"
        ),
        "grad: scan+checkpoint vs scan": max_diff(
            "exact grad scan + checkpoint per step", "exact grad scan, no checkpoint"
        ),
    }
    grad_scale = float(np.abs(outputs["exact grad scan + checkpoint per step"]).max())
    for what, d in agreement.items():
        print(f"max abs difference, {what}: {d:.2e}")
    print(f"(gradient max abs {grad_scale:.2f})")

    fwd_ratio = results["forward diffrax"]["steady_s"] / results["forward scan"]["steady_s"]
    scan_ckpt = results["exact grad scan + checkpoint per step"]["steady_s"]
    ratios = {
        "forward diffrax / scan": fwd_ratio,
        "grad diffrax default / scan+checkpoint": results[
            "exact grad diffrax (default checkpoints)"
        ]["steady_s"]
        / scan_ckpt,
        "grad diffrax checkpoints=n / scan+checkpoint": results[
            "exact grad diffrax (checkpoints = n)"
        ]["steady_s"]
        / scan_ckpt,
        "grad scan no checkpoint / scan+checkpoint": results["exact grad scan, no checkpoint"][
            "steady_s"
        ]
        / scan_ckpt,
        "network VJP in scan / VJP alone (per call)": results[f"network VJP x{n} in lax.scan"][
            "steady_s"
        ]
        / n
        / results["network VJP x1"]["steady_s"],
        "network VJP alone / forward alone": results["network VJP x1"]["steady_s"]
        / results["network forward x1"]["steady_s"],
    }
    rows = [
        [
            name,
            f"{r['compile_s']:.1f}",
            f"{r['steady_s'] * 1e3:.1f}",
            f"{r['steady_s'] * 1e3 / (n if 'x1' not in name else 1):.2f}",
            r["repeats"],
            f"{r['cpu_per_wall']:.2f}",
            common.fmt_load(r),
        ]
        for name, r in results.items()
    ]
    tab = common.markdown_table(
        [
            "case",
            "compile (s)",
            "steady (ms)",
            "per step (ms)",
            "repeats",
            "CPU/wall",
            "others CPU/wall",
        ],
        rows,
    )
    print()
    print(tab)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    common.write_json(
        args.out,
        {
            "environment": env,
            "config": {
                **config,
                "n_steps": n,
                "default_checkpoints": common.default_checkpoints(n),
            },
            "command": common.command("benchmarks.solver_overhead", argv),
            "results": results,
            "agreement_max_abs": agreement,
            "gradient_max_abs": grad_scale,
            "ratios": ratios,
            "table": tab,
            "total_s": total,
        },
    )
    bad = {k: v for k, v in agreement.items() if not v <= args.atol * max(1.0, grad_scale)}
    if bad:
        print(f"DISAGREEMENT above atol={args.atol}: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
