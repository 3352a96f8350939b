"""CPU benchmark of one DiffPure purification and its input gradient (small NCSN++).

For a batch of 32x32x3 images in [0, 1] purified at t_star=0.1 with dt=1e-3 (100 Euler steps),
each case measures

* compile time: trace + lower + XLA compile (`jax.jit(f).lower(*args).compile()`), and the first
  call (compile time plus the first execution);
* steady-state time: min over `--repeats` executions after one warm-up execution, each ended by
  `block_until_ready`;
* memory: XLA's compiled memory analysis (temp buffers, arguments, outputs) and the increase of the
  process peak RSS (`ru_maxrss`) over the level reached after loading the model.

Cases: forward only (`purify`), and the gradient of sum(w * purify(x)) with respect to x, for the
Brownian paths 'grid' and 'tree' and the gradient modes 'exact' (checkpoints=None: ~log2(n_steps)
stored states; checkpoints=n_steps: every state stored) and 'adjoint'.

Each case runs in a fresh subprocess (unless --no-isolate) so that the peak RSS of one case does
not hide the next one's, and compilation caches do not carry over.

    python -m benchmarks.purify_cpu                  # all cases, writes benchmarks/results/
    python benchmarks/purify_cpu.py --cases forward-grid,grad-exact-grid --repeats 1
"""

from __future__ import annotations

import os

# Benchmark hygiene (diffrax FAQ, "how do I benchmark diffrax?"): by default equinox's runtime
# checks (`eqx.error_if`, used by diffrax and by `check_images`) raise through a host callback,
# which adds a host round trip and blocks some XLA optimisations. With EQX_ON_ERROR=nan a failed
# check only turns the result into NaN, so the timed program is the pure computation. This must be
# set before equinox/diffrax are imported; we check that the outputs are finite instead.
os.environ["EQX_ON_ERROR"] = "nan"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/purify_cpu.py` from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_CHECKPOINT = "/work/shared/reference/score_sde_cifar10_small.pth"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "purify_cpu.json"
SMALL_MODEL = {"nf": 16, "num_res_blocks": 2}
MB = 1e6


def _cases() -> dict[str, dict]:
    """name -> case. checkpoints 'n_steps' means checkpoints = config.n_steps."""
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
        cases[f"grad-exact-ckpt{{n}}-{path}"] = dict(
            mode="grad", brownian=path, grad="exact", ckpt="n_steps"
        )
        cases[f"grad-adjoint-{path}"] = dict(mode="grad", brownian=path, grad="adjoint", ckpt=None)
    return cases


CASES = _cases()


def _case_names(n_steps: int) -> dict[str, dict]:
    return {name.replace("{n}", str(n_steps)): case for name, case in CASES.items()}


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu_seconds() -> float | None:
    """CPU seconds all processes have used (Linux /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        busy = sum(values) - values[3] - values[4]  # minus idle, iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _git_revision() -> dict:
    """The library's commit and whether diffpure_jax/ differs from it (read-only git calls)."""

    def git(*cmd):
        return subprocess.run(
            ["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "diffpure_jax_dirty": bool(git("status", "--porcelain", "--", "diffpure_jax")),
    }


def _memory_analysis(compiled) -> dict:
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # not implemented on some backends / versions
        return {"error": f"{type(e).__name__}: {e}"}
    if stats is None:
        return {"error": "memory_analysis() returned None"}
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
        "peak_memory_in_bytes",
    )
    out = {}
    for field in fields:
        value = getattr(stats, field, None)
        if value is not None:
            out[field] = int(value)
    return out


def run_case(name: str, case: dict, args: argparse.Namespace) -> dict:
    """Compile and time one case in this process."""
    import jax
    import jax.numpy as jnp

    from diffpure_jax import PurifyConfig, load_score_model
    from diffpure_jax.purify import purify

    score = load_score_model(args.model_dir)
    n_steps = int(round(args.t_star / args.dt))
    checkpoints = n_steps if case["ckpt"] == "n_steps" else case["ckpt"]
    cfg = PurifyConfig(
        t_star=args.t_star,
        dt=args.dt,
        brownian=case["brownian"] or "grid",
        grad=case["grad"] or "exact",
        checkpoints=checkpoints,
    )
    kx, kw, key = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.uniform(kx, (args.batch, *score.image_shape), jnp.float32)
    w = jax.random.normal(kw, x.shape, jnp.float32)

    t_mid = jnp.full((args.batch,), 0.5 * args.t_star, jnp.float32)
    if case["mode"] == "score":
        fn = jax.jit(lambda s, x: s(2.0 * x - 1.0, t_mid))
        call_args = (score, x)
    elif case["mode"] == "score_vjp":

        def score_loss(x, s, w):
            return jnp.sum(w * s(2.0 * x - 1.0, t_mid))

        fn = jax.jit(jax.grad(score_loss))
        call_args = (x, score, w)
    elif case["mode"] in ("score_vjp_scan", "score_vjp_unroll"):
        unroll = 10 if case["mode"] == "score_vjp_unroll" else 1

        def vjp_loop(s, x, w):
            def body(y, k):
                t = t_mid + 1e-3 * k.astype(jnp.float32)
                _, vjp = jax.vjp(lambda y: s(y, t), y)
                return y + 1e-3 * vjp(w)[0], None

            return jax.lax.scan(body, 2.0 * x - 1.0, jnp.arange(10), unroll=unroll)[0]

        fn = jax.jit(vjp_loop)
        call_args = (score, x, w)
    elif case["mode"] == "forward":
        fn = jax.jit(lambda s, x, k: purify(s, cfg, x, k))
        call_args = (score, x, key)
    else:

        def loss(x, s, w, k):
            return jnp.sum(w * purify(s, cfg, x, k))

        fn = jax.jit(jax.grad(loss))
        call_args = (x, score, w, key)
    jax.block_until_ready(call_args)

    is_solve = case["mode"] in ("forward", "grad")
    result = {
        "case": name,
        "mode": case["mode"],
        "brownian": cfg.brownian if is_solve else None,
        "grad": cfg.grad if case["mode"] == "grad" else None,
        "checkpoints": cfg.checkpoints if case["mode"] == "grad" else None,
        "n_steps": cfg.n_steps if is_solve else None,
        "loadavg_before": os.getloadavg()[0],
    }
    rss_base = _maxrss_bytes()
    try:
        t0 = time.perf_counter()
        lowered = fn.lower(*call_args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        rss_compile = _maxrss_bytes()
        out = jax.block_until_ready(compiled(*call_args))
        t3 = time.perf_counter()
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        return result
    first_run = t3 - t2
    repeats = args.repeats
    if first_run * args.repeats > args.budget_s:
        repeats = 1
    times = []
    cpu0, machine0 = _cpu_seconds(), _machine_cpu_seconds()
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        times.append(time.perf_counter() - t)
    own = _cpu_seconds() - cpu0
    cpu_per_wall = own / sum(times)
    machine1 = _machine_cpu_seconds()
    others = None if machine0 is None or machine1 is None else machine1 - machine0 - own
    result.update(
        trace_lower_s=t1 - t0,
        compile_s=t2 - t0,  # trace + lower + XLA compile
        first_call_s=t3 - t0,  # what the first `jax.jit(f)(*args)` call costs
        warmup_run_s=first_run,
        run_s=times,
        steady_s=min(times),
        repeats=repeats,
        repeats_reduced=repeats < args.repeats,
        # Process CPU seconds per wall second in the timed runs: ~cpu_count when XLA had every
        # core; lower means waiting (e.g. other processes on the machine).
        cpu_per_wall=cpu_per_wall,
        # CPU seconds per wall second that other processes used meanwhile: ~0 on a quiet machine.
        others_cpu_per_wall=None if others is None else max(0.0, others / sum(times)),
        loadavg_after=os.getloadavg()[0],
        finite=bool(jnp.all(jnp.isfinite(out))),
        xla_memory=_memory_analysis(compiled),
        rss_baseline_bytes=rss_base,
        rss_compile_increase_bytes=rss_compile - rss_base,
        rss_peak_increase_bytes=_maxrss_bytes() - rss_base,
    )
    return result


def environment() -> dict:
    import diffrax
    import equinox
    import flax
    import jax
    import jaxlib

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "n_devices": jax.device_count(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
        "flax": flax.__version__,
        "EQX_ON_ERROR": os.environ.get("EQX_ON_ERROR"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        **_git_revision(),
    }


def _fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:.1f}"


def table(results: list[dict]) -> str:
    columns = (
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
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        if "error" in r:
            rest = " |" * (len(columns) - 2)
            lines.append(f"| {r['case']} | error: {r['error'][:100]} |{rest}")
            continue
        mem = r["xla_memory"]
        reps = f"{r['repeats']}" + (" (reduced)" if r["repeats_reduced"] else "")
        if not r["finite"]:
            reps += " NaN!"
        cells = (
            r["case"],
            f"{r['compile_s']:.1f}",
            f"{r['first_call_s']:.1f}",
            f"{r['warmup_run_s'] * 1e3:.0f}",
            f"{r['steady_s'] * 1e3:.0f}",
            reps,
            f"{r['cpu_per_wall']:.2f}",
            "-" if r.get("others_cpu_per_wall") is None else f"{r['others_cpu_per_wall']:.2f}",
            _fmt_mb(mem.get("temp_size_in_bytes")),
            _fmt_mb(mem.get("argument_size_in_bytes")),
            _fmt_mb(mem.get("output_size_in_bytes")),
            _fmt_mb(r["rss_peak_increase_bytes"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine_busy(sample_s: float = 1.0) -> float | None:
    """Fraction of all cores busy over `sample_s` (Linux /proc/stat); None elsewhere."""

    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_until_idle(max_wait_s: float, threshold: float = 0.15) -> tuple[float | None, float]:
    """Wait (up to max_wait_s) until other processes use < threshold of the machine."""
    start = time.perf_counter()
    busy = _machine_busy()
    while busy is not None and busy > threshold and time.perf_counter() - start < max_wait_s:
        time.sleep(4.0)
        busy = _machine_busy()
    return busy, time.perf_counter() - start


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
        help="if warm-up run x repeats exceeds this, time a single run for that case",
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

    env = environment()
    tmp = None
    if args.model_dir is None:
        from diffpure_jax.convert.score_sde import convert_score_sde

        tmp = tempfile.mkdtemp(prefix="purify_cpu_")
        args.model_dir = os.path.join(tmp, "score_small")
        convert_score_sde(args.checkpoint, args.model_dir, **SMALL_MODEL)
    config = {
        "model": f"NCSN++ small ({args.checkpoint}, {SMALL_MODEL})",
        "batch": args.batch,
        "image_shape": [32, 32, 3],
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
    print("environment:", json.dumps(env, indent=1))
    print("config:", json.dumps(config, indent=1))

    results = []
    start = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        attempts = []
        for _ in range(1 + args.retries):
            busy, waited = _wait_until_idle(args.max_wait_idle_s)
            if args.no_isolate:
                result = run_case(name, cases[name], args)
            else:
                result = _run_isolated(name, args)
            result["machine_busy_before"] = busy
            result["waited_for_idle_s"] = waited
            attempts.append(result)
            others = result.get("others_cpu_per_wall")
            if others is None or others <= args.max_others_load:
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "environment": env,
                "config": config,
                "results": results,
                "total_s": total,
                "command": " ".join(
                    [Path(sys.executable).name, "-m", "benchmarks.purify_cpu"]
                    + (argv if argv is not None else sys.argv[1:])
                ),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
