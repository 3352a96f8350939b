"""Purification and input-gradient throughput (images/s) over batch sizes, small and full NCSN++.

For each model ('small': nf=16, 2 res blocks, 0.62M params; 'full': score_sde's CIFAR-10 DDPM++
deep continuous, 106.6M params; random weights, see common.py) and batch size, measures

* `forward`: one purification, `purify(score, config, x, key)`;
* `exact`: the input gradient of sum(w * purify(x)), grad='exact' (diffrax
  RecursiveCheckpointAdjoint, default checkpoints);
* `adjoint`: the same with grad='adjoint' (the torchsde-style continuous adjoint);

and, with --bf16 (default on), `forward` and `exact` at the largest batch with
score_dtype='bfloat16'. The default step counts are small so that a CPU run stays short: the
cost is linear in the number of steps (a fixed-step solve), so each row also gives the cost per
image per step and the linear extrapolation to DiffPure's 100 steps (t* = 0.1, dt = 1e-3). On a
GPU, scale up: `--t-star-full 0.1 --batches-full 1,8,32,128`.

    python -m benchmarks.throughput                  # small model
    python -m benchmarks.throughput --models full    # full-size model
    python -m benchmarks.throughput --models small,full   # both: writes throughput_small_full.json

Results and run times: benchmarks/README.md.
"""

from __future__ import annotations

import os

# Before equinox/diffrax are imported (benchmark hygiene, see common.py).
os.environ["EQX_ON_ERROR"] = "nan"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import PurifyConfig  # noqa: E402

DEFAULT_OUT = common.RESULTS / "throughput_{models}.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small", help="small and/or full (comma-separated)")
    p.add_argument("--batches-small", default="1,2,4,8")
    p.add_argument("--batches-full", default="1,2")
    p.add_argument("--t-star-small", type=float, default=0.01, help="10 steps at dt=1e-3")
    p.add_argument("--t-star-full", type=float, default=0.005, help="5 steps at dt=1e-3")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--modes", default="forward,exact,adjoint")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=15.0, help="max timed seconds per case")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def run_case(score, model, batch, mode, t_star, args, score_dtype="float32") -> dict:
    grad = "exact" if mode == "forward" else mode
    config = PurifyConfig(t_star=t_star, dt=args.dt, grad=grad, score_dtype=score_dtype)
    x, w, key = common.inputs(batch)
    if mode == "forward":
        fn, fargs = common.purify_fn(config), (score, x, key)
    else:
        fn, fargs = common.grad_fn(config), (x, score, w, key)
    r = common.measure(fn, fargs, args.repeats, args.budget_s, analyses=False)
    n = config.n_steps
    per_image_step = r["steady_s"] / (batch * n)
    r.update(
        model=model,
        batch=batch,
        mode=mode,
        score_dtype=score_dtype,
        n_steps=n,
        t_star=t_star,
        images_per_s=batch / r["steady_s"],
        s_per_image_step=per_image_step,
        s_per_image_100_steps=100 * per_image_step,  # linear extrapolation
        images_per_s_100_steps=1.0 / (100 * per_image_step),
    )
    return r


def table(results) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                r["mode"] + ("" if r["score_dtype"] == "float32" else " bf16"),
                r["batch"],
                r["n_steps"],
                f"{r['compile_s']:.1f}",
                f"{r['steady_s'] * 1e3:.0f}",
                f"{r['images_per_s']:.2f}",
                f"{r['s_per_image_step'] * 1e3:.1f}",
                f"{r['s_per_image_100_steps']:.2f}",
                f"{r['images_per_s_100_steps']:.3f}",
                f"{r['cpu_per_wall']:.2f}",
                common.fmt_load(r),
            ]
        )
    return common.markdown_table(
        [
            "model",
            "mode",
            "batch",
            "steps",
            "compile (s)",
            "steady (ms)",
            "images/s",
            "ms / image / step",
            "s / image @100 steps (extrap.)",
            "images/s @100 steps (extrap.)",
            "CPU/wall",
            "others CPU/wall",
        ],
        rows,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    models = args.models.split(",")
    modes = args.modes.split(",")
    batches = {
        "small": [int(b) for b in args.batches_small.split(",")],
        "full": [int(b) for b in args.batches_full.split(",")],
    }
    t_stars = {"small": args.t_star_small, "full": args.t_star_full}
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "solver": "euler"}
    env = common.header("throughput", config)

    results = []
    start = time.perf_counter()
    for model in models:
        score = common.random_score(model)
        for batch in batches[model]:
            for mode in modes:
                r = run_case(score, model, batch, mode, t_stars[model], args)
                results.append(r)
                print(
                    f"[{time.perf_counter() - start:6.0f} s] {model} b={batch} {mode}: "
                    f"{r['steady_s'] * 1e3:.0f} ms, {r['images_per_s']:.2f} img/s",
                    flush=True,
                )
        if args.bf16:
            for mode in [m for m in ("forward", "exact") if m in modes]:
                batch = batches[model][-1]
                r = run_case(score, model, batch, mode, t_stars[model], args, "bfloat16")
                results.append(r)
                print(f"  bf16 {model} b={batch} {mode}: {r['steady_s'] * 1e3:.0f} ms", flush=True)
        del score
        jax.clear_caches()
    total = time.perf_counter() - start
    print()
    print(table(results))
    print(f"\ntotal {total:.0f} s")
    common.write_json(
        args.out.format(models="_".join(models)),
        {
            "environment": env,
            "config": config,
            "command": common.command("benchmarks.throughput", argv),
            "results": results,
            "table": table(results),
            "total_s": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
