"""Time and memory of one DiffPure purification and its input gradient, per Brownian path and
gradient mode (the reference small NCSN++, batch of 32x32x3 images, t_star=0.1, dt=1e-3).

Cases (`--list`): one score-network call and its VJP (the per-step unit cost), that VJP 10 times in
a `lax.scan` and unrolled; `purify` forward, and the gradient of sum(w * purify(x)) in x, for the
Brownian paths 'grid' and 'tree' and the gradient modes 'exact' (every state kept, the default, or
equinox's sqrt(2 n_steps) states) and 'adjoint'. Each case is compiled and timed with
`common.compile_fn` / `common.time_compiled`, and also records the first-call time, XLA's memory
analysis and the increase of the process peak RSS. Each case runs in a fresh subprocess (unless
--no-isolate), so that one case's peak RSS and compilation caches do not carry over; a case
disturbed by other processes is retried.

    python -m benchmarks.purify_cpu                  # all cases, writes results/purify_cpu.json
    python benchmarks/purify_cpu.py --cases forward-grid,grad-exact-grid --repeats 1

Results and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/purify_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from benchmarks import common  # noqa: E402  (sets EQX_ON_ERROR=nan before jax is imported)

DEFAULT_CHECKPOINT = str(common.REFERENCE / "score_sde_cifar10_small.pth")
DEFAULT_OUT = common.RESULTS / "purify_cpu.json"


def _cases() -> dict[str, dict]:
    """name -> case. ckpt None: the library's default (every state); 'sqrt': equinox's own
    default, floor(sqrt(2 n_steps + 1/4) - 1/2) states (the library's default before 2026-12)."""
    cases = {
        # One score-network evaluation on the batch, and its VJP in x: the per-step unit cost.
        "score-net-forward": dict(mode="score", brownian=None, grad=None, ckpt=None),
        "score-net-vjp": dict(mode="score_vjp", brownian=None, grad=None, ckpt=None),
        # The same VJP, 10 times in a lax.scan (as in a solve's backward pass) or unrolled.
        "score-net-vjp-scan10": dict(mode="score_vjp_scan", brownian=None, grad=None, ckpt=None),
        "score-net-vjp-unroll10": dict(
            mode="score_vjp_unroll", brownian=None, grad=None, ckpt=None
        ),
    }
    for path in ("grid", "tree"):
        cases[f"forward-{path}"] = dict(mode="forward", brownian=path, grad="exact", ckpt=None)
    for path in ("grid", "tree"):
        cases[f"grad-exact-{path}"] = dict(mode="grad", brownian=path, grad="exact", ckpt=None)
        cases[f"grad-exact-sqrt-{path}"] = dict(
            mode="grad", brownian=path, grad="exact", ckpt="sqrt"
        )
        cases[f"grad-adjoint-{path}"] = dict(mode="grad", brownian=path, grad="adjoint", ckpt=None)
    return cases


CASES = _cases()


def _case_names(n_steps: int) -> dict[str, dict]:
    return {name.replace("{n}", str(n_steps)): case for name, case in CASES.items()}


def _program(case: dict, cfg, score, x, w, key, t_star: float):
    """(jit-able function, its arguments) for one case; the score model is an argument."""
    import jax
    import jax.numpy as jnp

    t_mid = jnp.full((x.shape[0],), 0.5 * t_star, jnp.float32)
    mode = case["mode"]
    if mode == "score":
        return (lambda s, x: s(2.0 * x - 1.0, t_mid)), (score, x)
    if mode == "score_vjp":
        return jax.grad(lambda x, s, w: jnp.sum(w * s(2.0 * x - 1.0, t_mid))), (x, score, w)
    if mode in ("score_vjp_scan", "score_vjp_unroll"):
        unroll = 10 if mode == "score_vjp_unroll" else 1

        def vjp_loop(s, x, w):
            def body(y, k):
                t = t_mid + 1e-3 * k.astype(jnp.float32)
                _, vjp = jax.vjp(lambda y: s(y, t), y)
                return y + 1e-3 * vjp(w)[0], None

            return jax.lax.scan(body, 2.0 * x - 1.0, jnp.arange(10), unroll=unroll)[0]

        return vjp_loop, (score, x, w)
    if mode == "forward":
        return common.purify_fn(cfg), (score, x, key)
    return common.grad_fn(cfg), (x, score, w, key)


def run_case(name: str, case: dict, args: argparse.Namespace) -> dict:
    """Compile and time one case in this process."""
    import jax

    from diffpure_jax import PurifyConfig, load_score_model

    score = load_score_model(args.model_dir)
    n_steps = int(round(args.t_star / args.dt))
    cfg = PurifyConfig(
        t_star=args.t_star,
        dt=args.dt,
        brownian=case["brownian"] or "grid",
        grad=case["grad"] or "exact",
        checkpoints=common.default_checkpoints(n_steps) if case["ckpt"] == "sqrt" else None,
    )
    x, w, key = common.inputs(args.batch, args.seed, score.image_shape)
    fn, call_args = _program(case, cfg, score, x, w, key, args.t_star)
    call_args = jax.block_until_ready(call_args)

    is_solve = case["mode"] in ("forward", "grad")
    result = {
        "case": name,
        "mode": case["mode"],
        "brownian": cfg.brownian if is_solve else None,
        "grad": cfg.grad if case["mode"] == "grad" else None,
        "checkpoints": cfg.n_checkpoints if case["mode"] == "grad" else None,
        "n_steps": cfg.n_steps if is_solve else None,
        "loadavg_before": os.getloadavg()[0],
    }
    rss_base = common.maxrss_bytes()
    try:
        compiled, timings = common.compile_fn(fn, call_args)
        rss_compile = common.maxrss_bytes()
        result.update(timings)
        result.update(common.time_compiled(compiled, call_args, args.repeats, args.budget_s))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        return result
    result.update(
        first_call_s=result["compile_s"] + result["warmup_s"],  # a first `jax.jit(f)(*args)`
        repeats_reduced=result["repeats"] < args.repeats,
        loadavg_after=os.getloadavg()[0],
        xla_memory=common.memory_analysis(compiled),
        rss_baseline_bytes=rss_base,
        rss_compile_increase_bytes=rss_compile - rss_base,
        rss_peak_increase_bytes=common.maxrss_bytes() - rss_base,
    )
    return result


def table(results: list[dict]) -> str:
    columns = [
        "case",
        "compile (s)",
        "first call (s)",
        "warm-up run (ms)",
        "steady (ms)",
        "repeats",
        "CPU/wall",
        "others CPU/wall",
        "XLA temp (MB)",
        "XLA args (MB)",
        "XLA out (MB)",
        "peak RSS + (MB)",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], f"error: {r['error'][:100]}"] + [""] * (len(columns) - 2))
            continue
        mem = r["xla_memory"]
        reps = f"{r['repeats']}" + (" (reduced)" if r["repeats_reduced"] else "")
        if not r["finite"]:
            reps += " NaN!"
        rows.append(
            [
                r["case"],
                f"{r['compile_s']:.1f}",
                f"{r['first_call_s']:.1f}",
                f"{r['warmup_s'] * 1e3:.0f}",
                f"{r['steady_s'] * 1e3:.0f}",
                reps,
                f"{r['cpu_per_wall']:.2f}",
                common.fmt_load(r),
                common.fmt_mb(mem.get("temp_size_in_bytes")),
                common.fmt_mb(mem.get("argument_size_in_bytes")),
                common.fmt_mb(mem.get("output_size_in_bytes")),
                common.fmt_mb(r["rss_peak_increase_bytes"]),
            ]
        )
    return common.markdown_table(columns, rows)


def _run_isolated(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--worker-out",
            str(out),
            "--model-dir",
            args.model_dir,
            "--batch",
            str(args.batch),
            "--t-star",
            repr(args.t_star),
            "--dt",
            repr(args.dt),
            "--repeats",
            str(args.repeats),
            "--budget-s",
            repr(args.budget_s),
            "--seed",
            str(args.seed),
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.case_timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return {"case": name, "error": f"timed out after {args.case_timeout_s} s"}
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"case": name, "error": f"worker exited {proc.returncode}: {tail[0][:400]}"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    p.add_argument(
        "--budget-s",
        type=float,
        default=90.0,
        help="fewer timed runs (at least one) for a case if they would take longer than this",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="score_sde .pth to convert")
    p.add_argument("--model-dir", help="an already converted score model (skips conversion)")
    p.add_argument("--cases", help="comma-separated case names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    p.add_argument("--no-isolate", action="store_true", help="run all cases in this process")
    p.add_argument("--case-timeout-s", type=float, default=900.0)
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="rerun a case (up to this many times) if other processes used more CPU than "
        "--max-others-load during its timed runs; the least disturbed attempt is kept",
    )
    p.add_argument("--max-others-load", type=float, default=0.2, help="CPU seconds per second")
    p.add_argument(
        "--max-wait-idle-s",
        type=float,
        default=120.0,
        help="before each case, wait up to this long for other processes to leave the CPU idle",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n_steps = int(round(args.t_star / args.dt))
    cases = _case_names(n_steps)

    if args.worker:
        try:
            result = run_case(args.worker, cases[args.worker], args)
        except Exception as e:
            traceback.print_exc()
            result = {"case": args.worker, "error": f"{type(e).__name__}: {e}"[:500]}
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    if args.list:
        print("\n".join(cases))
        return 0
    names = list(cases) if not args.cases else [c.strip() for c in args.cases.split(",")]
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(cases)}")

    tmp = None
    small = common.MODELS["small"]
    if args.model_dir is None:
        from diffpure_jax.convert.score_sde import convert_score_sde

        tmp = tempfile.mkdtemp(prefix="purify_cpu_")
        args.model_dir = os.path.join(tmp, "score_small")
        convert_score_sde(args.checkpoint, args.model_dir, **small)
    config = {
        "model": f"NCSN++ small ({args.checkpoint}, {small})",
        "batch": args.batch,
        "image_shape": list(common.IMAGE_SHAPE),
        "t_star": args.t_star,
        "dt": args.dt,
        "n_steps": n_steps,
        "solver": "euler",
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "seed": args.seed,
        "isolated_processes": not args.no_isolate,
        "max_wait_idle_s": args.max_wait_idle_s,
        "retries": args.retries,
        "max_others_load": args.max_others_load,
    }
    env = common.header("purify_cpu", config)

    results = []
    start = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        attempts = []
        for attempt in range(1 + args.retries):
            busy, waited = common.wait_until_idle(args.max_wait_idle_s)
            if args.no_isolate:
                result = run_case(name, cases[name], args)
            else:
                result = _run_isolated(name, args)
            result["machine_busy_before"] = busy
            result["waited_for_idle_s"] = waited
            attempts.append(result)
            others = result.get("others_cpu_per_wall")
            if others is None or others <= args.max_others_load or attempt == args.retries:
                break
            print(f"  {name}: other processes used {others:.2f} CPU/s, retrying", flush=True)
        # The attempt least disturbed by other processes.
        result = min(attempts, key=lambda r: r.get("others_cpu_per_wall") or 0.0)
        result["attempts"] = len(attempts)
        results.append(result)
        status = result.get("error") or f"steady {result['steady_s'] * 1e3:.0f} ms"
        print(f"[{time.perf_counter() - t:6.1f} s] {name}: {status}", flush=True)
    total = time.perf_counter() - start

    print()
    print(table(results))
    print(f"\ntotal benchmark time {total:.0f} s")
    common.write_json(
        args.out,
        {
            "environment": env,
            "config": config,
            "results": results,
            "total_s": total,
            "command": common.command("benchmarks.purify_cpu", argv),
        },
    )
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
