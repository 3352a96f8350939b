"""One prepared accelerator benchmark of DiffPure's full-size CIFAR-10 path, run once per GPU.

The path: score_sde's NCSN++ (cifar10_ddpmpp_deep_continuous, 106.6M params) behind a WRN-28-10
(36.5M), random weights, t* = 0.1, dt = 1e-3 (100 Euler-Maruyama steps), grid Brownian path.

1. For score_dtype float32 and bfloat16 and each batch in --batches (16, 64, 256): purification
   (`forward`) and the `exact` input gradient of the summed cross-entropy through purifier and
   classifier (`DefendedClassifier`, diffrax RecursiveCheckpointAdjoint, every state kept):
   compile time, steady run time (common.time_compiled: warm-up, minimum of repeats), images/s,
   XLA's compiled memory, the device's peak memory (GPU only), FLOPs and FLOP/s against a large
   matmul of the same dtype measured in the same run. XLA's cost analysis counts a loop body
   once, so FLOPs are counted per network call and multiplied by the steps (as utilization.py
   does); each forward row records how many steps the compiled count covers, as a check.
2. AutoAttack-rand (APGD-CE + APGD-DLR, 100 iterations, EOT 20, exact gradients) on 512 images:
   the cost of one APGD-EOT iteration, DERIVED from part 1's best gradient throughput (one
   iteration is one exact gradient per image and EOT draw: 20 per image), and the projected
   GPU-hours, next to the official code's ~33 h on 4 A100s for 64 images (adjoint).
3. Compile only (abstract weights, nothing runs): the largest batch of the exact gradient that
   fits in 80 GB and in 141 GB, from XLA's memory analysis at --sizing-batches extrapolated
   along the line through the two largest (points part 1 already compiled are reused: the same
   program); and the per-device memory of the exact gradient of a batch sharded over an
   8-device `data` mesh (diffpure_jax.sharding), on the real devices when there are 8
   accelerators, else in a subprocess on 8 forced CPU devices (then the CPU compiler's figures).
4. JSON (benchmarks/results/accelerator_<platform>.json) and markdown tables.

--budget-s (420) keeps a GPU run under 8 minutes: a case whose projected compile + two runs
would not fit (in what is left after what part 3 needs) is compiled only or skipped, and the JSON
says so. --tiny swaps in tiny models (an 11k-param NCSN++, WRN-10-1, t* = 0.002, batches 2 and 4,
matmul 256) so the whole script runs on a CPU (tests/test_accelerator_benchmark.py).

    python -m benchmarks.accelerator                 # on a GPU session
    python -m benchmarks.accelerator --sizing-only   # part 3 only
    python -m benchmarks.accelerator --tiny --out /tmp/accelerator_tiny.json

Results: benchmarks/README.md, section 13.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)
# JAX preallocates 75% of a GPU by default; the large batches need more.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import DefendedClassifier, Purifier, PurifyConfig  # noqa: E402

GB = 1e9
CAPACITIES = {"80 GB": 80 * GB, "141 GB": 141 * GB}  # nominal, decimal: below the physical size
TINY_SCORE = common.MODELS["tiny"]  # 10,883 params
PRESETS = {
    "full": {
        "batches": "16,64,256",
        "t_star": 0.1,
        "classifier": (28, 10),
        "sizing_batches": "16,64,256",
        "sizing_dtypes": "float32,bfloat16",
        "sharded_batch": 256,
    },
    "tiny": {
        "batches": "2,4",
        "t_star": 0.002,
        "classifier": (10, 1),
        "sizing_batches": "4,8",
        "sizing_dtypes": "float32",
        "sharded_batch": 16,
        "matmul_size": 256,
    },
}
# Compile-time guesses (s) before any compile of a mode is measured (budget planning only).
DEFAULT_COMPILE_S = {"forward": 45.0, "exact": 120.0}
# DiffPure issue #28: AutoAttack-rand, CIFAR-10 ResNet-50 classifier, one 64-image batch,
# 118,755 s (about 33 h) on 4 A100s with the adjoint (../shared/background/diffpure_official.md).
OFFICIAL = {"images": 64, "wall_h": 118755 / 3600, "gpus": 4, "gpu": "A100", "grad": "adjoint"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, for a CPU (tests)")
    p.add_argument("--batches", help="part 1 batches (16,64,256; tiny 2,4)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="score_dtype values")
    p.add_argument("--t-star", type=float, help="0.1 (tiny 0.002)")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--matmul-size", type=int, help="8192 on an accelerator, 2048 on CPU, tiny 256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case-budget-s", type=float, default=30.0, help="timed seconds per case")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run")
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--eot", type=int, default=20)
    p.add_argument("--sizing-batches", help="16,64,256 (tiny 4,8)")
    p.add_argument("--sizing-dtypes", help="float32,bfloat16 (tiny float32)")
    p.add_argument("--sharded-batch", type=int, help="global batch over 8 devices (256; tiny 16)")
    p.add_argument("--sharded-devices", type=int, default=8)
    p.add_argument("--sharded-timeout-s", type=float, default=600.0)
    p.add_argument("--no-sharded", dest="sharded", action="store_false")
    p.add_argument("--sizing-only", action="store_true", help="part 3 only (compile only)")
    p.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="default benchmarks/results/accelerator_<platform>[_tiny].json")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "full"]
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.matmul_size is None:
        args.matmul_size = 2048 if jax.default_backend() == "cpu" else 8192
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.dtypes = args.dtypes.split(",")
    args.sizing_batches = [int(b) for b in str(args.sizing_batches).split(",")]
    args.sizing_dtypes = args.sizing_dtypes.split(",")
    return args


# --------------------------------------------------------------------------------------------
# models and cases


def build(tiny: bool, depth_widen: tuple[int, int], abstract: bool, seed: int = 0):
    """(ScoreModel, Classifier): NCSN++ (full or tiny) and a WRN; random or abstract weights."""
    from diffpure_jax.convert.score_sde import SDE, abstract_variables, architecture
    from diffpure_jax.models.ncsnpp import NCSNpp
    from diffpure_jax.score import ScoreModel, eps_continuous_score_fn
    from diffpure_jax.sde import VPSDE

    kwargs = architecture(**(TINY_SCORE if tiny else common.MODELS["full"]))
    variables = abstract_variables(kwargs)
    if not abstract:
        variables = common.random_variables(variables, seed)
    sde = VPSDE(**SDE)
    module = NCSNpp(**kwargs)
    score = ScoreModel(
        variables, eps_continuous_score_fn(module.apply, sde), sde, common.IMAGE_SHAPE
    )
    return score, common.random_classifier(*depth_widen, seed=seed + 1, abstract=abstract)


def defended(models, config: PurifyConfig) -> DefendedClassifier:
    score, classifier = models
    return DefendedClassifier(Purifier(score, config), classifier)


def forward_case(model, x, y, key):
    """One purification (the classifier is not called)."""
    del y
    return model.purifier(x, key)


def exact_case(model, x, y, key):
    """d/dx of the summed cross-entropy of the defended logits (grad mode of model's config)."""

    def loss(x):
        return optax.softmax_cross_entropy_with_integer_labels(model(x, key), y).sum()

    return jax.grad(loss)(x)


CASES = {"forward": forward_case, "exact": exact_case}


def case_inputs(batch: int, abstract: bool = False, batch_sharding=None, key_sharding=None):
    """(x in [0, 1], integer labels y, key); ShapeDtypeStructs when abstract."""
    shape = (batch, *common.IMAGE_SHAPE)
    if abstract:
        k = jax.eval_shape(lambda: jax.random.key(2))
        return (
            jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
            jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=key_sharding),
        )
    x = jax.random.uniform(jax.random.key(0), shape, jnp.float32)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    return x, y, jax.random.key(2)


def need_bytes(m: dict) -> int | None:
    """Device bytes a compiled program needs: arguments + outputs + temp - aliased."""
    if "temp_size_in_bytes" not in m:
        return None
    parts = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return sum(m.get(k, 0) for k in parts) - m.get("alias_size_in_bytes", 0)


def device_memory() -> dict | None:
    """The first device's allocator statistics (GPU/TPU); None where not reported (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


# --------------------------------------------------------------------------------------------
# FLOPs


def matmul_reference(n: int, dtype: str, repeats: int) -> dict:
    """FLOP/s of an n x n matmul in `dtype` (2 n^3 FLOPs), common.measure."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    r = common.measure(lambda a, b: a @ b, (a, b), max(repeats, 5), 10.0)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": dtype,
        "flops": flops,
        "steady_s": r["steady_s"],
        "flops_per_s": flops / r["steady_s"],
        "cost_analysis_flops": r["xla_cost"].get("flops"),
        "others_cpu_per_wall": r["others_cpu_per_wall"],
    }


def program_flops(fn, args) -> tuple[float | None, str]:
    """XLA's FLOP count of a loop-free program: the lowered module's cost analysis (no compile),
    else the compiled one's."""
    lowered = jax.jit(fn).lower(*args)
    try:
        cost = lowered.cost_analysis()
        cost = [cost] if isinstance(cost, dict) else list(cost or [])
        flops = sum(float(c.get("flops", 0.0)) for c in cost if c)
    except Exception:
        flops = 0.0
    if flops > 0:
        return flops, "lowered"
    return common.cost_analysis(lowered.compile()).get("flops"), "compiled"


def flop_counts(models, config: PurifyConfig, batch: int) -> dict:
    """FLOPs per image of one purification and one exact gradient, counted per network call
    (benchmarks/utilization.py's method, plus the classifier's forward + VJP)."""
    from benchmarks.utilization import recompute_count

    score, classifier = models
    x, y, _ = case_inputs(batch)
    w = jax.random.normal(jax.random.key(3), x.shape)
    t = jnp.full((batch,), 0.5 * config.t_star)
    net, src = program_flops(lambda s, z: s(z, t), (score, 2 * x - 1))
    vjp, _ = program_flops(jax.grad(lambda z, s, w: jnp.sum(w * s(z, t))), (2 * x - 1, score, w))

    def cls_loss(x, c, y):
        return optax.softmax_cross_entropy_with_integer_labels(c(x, check=False), y).sum()

    cls, _ = program_flops(jax.grad(cls_loss), (x, classifier, y))
    n = config.n_steps
    calls = recompute_count(config)  # score calls in the checkpointed exact gradient
    recompute = max(0, calls - 2 * n)
    return {
        "batch": batch,
        "source": src,
        "net_per_image": net / batch,
        "net_vjp_per_image": vjp / batch,
        "classifier_vjp_per_image": cls / batch,
        "n_steps": n,
        "score_calls_in_exact_grad": calls,
        "recompute_forward_steps": recompute,
        "forward_per_image": n * net / batch,
        "exact_per_image": (n * (net + vjp) + recompute * net + cls) / batch,
    }


# --------------------------------------------------------------------------------------------
# budget


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def plan_case(left_s: float, reserve_s: float, compile_s: float, run_s: float, mode: str) -> str:
    """'run' when the compile and two runs (warm-up + one timed) fit in `left_s - reserve_s`;
    else 'compile' (exact gradients only: the memory analysis still feeds part 3) when the
    compile fits; else 'skip'."""
    avail = left_s - reserve_s
    if compile_s + 2.0 * run_s <= avail:
        return "run"
    if mode == "exact" and compile_s <= avail:
        return "compile"
    return "skip"


def estimates(rows: list[dict], mode: str, dtype: str, batch: int) -> tuple[float, float]:
    """(compile s, run s) of a case from the measured ones: compile as the last of the same mode
    (same dtype first), run scaled linearly in the batch (pessimistic on a GPU)."""
    same = [r for r in rows if r["mode"] == mode and "compile_s" in r]
    pick = [r for r in same if r["score_dtype"] == dtype] or same
    compile_s = pick[-1]["compile_s"] if pick else DEFAULT_COMPILE_S[mode]
    timed = [r for r in pick if "steady_s" in r] or [r for r in same if "steady_s" in r]
    run_s = timed[-1]["steady_s"] * batch / timed[-1]["batch"] if timed else 0.0
    return compile_s, run_s


# --------------------------------------------------------------------------------------------
# part 1: throughput, memory, FLOP/s


def throughput_case(row: dict, models, args, clock, reserve_s: float, run_est: float) -> dict:
    """Fills `row` (mode, score_dtype, batch, decision) as the case goes, so that an error
    keeps what was measured before it."""
    mode, dtype, batch, decision = (row[k] for k in ("mode", "score_dtype", "batch", "decision"))
    config = PurifyConfig(t_star=args.t_star, dt=args.dt, grad="exact", score_dtype=dtype)
    row["n_steps"] = config.n_steps
    if decision == "skip":
        row["status"] = "skipped: projected time exceeds --budget-s"
        return row
    fargs = jax.block_until_ready((defended(models, config), *case_inputs(batch)))
    before = device_memory()
    compiled, timing = common.compile_fn(CASES[mode], fargs)
    row.update(timing)
    row["xla_memory"] = common.memory_analysis(compiled)
    row["xla_flops_as_compiled"] = common.cost_analysis(compiled).get("flops")
    row["need_bytes"] = need_bytes(row["xla_memory"])
    limit = (before or {}).get("bytes_limit")
    if decision == "compile":
        row["status"] = "compiled only: two runs would exceed --budget-s"
        return row
    if limit and row["need_bytes"] and row["need_bytes"] > limit:
        row["status"] = f"compiled only: needs {row['need_bytes'] / GB:.1f} GB > {limit / GB:.1f}"
        return row
    budget = max(0.0, min(args.case_budget_s, clock.left() - reserve_s - run_est))
    row.update(common.time_compiled(compiled, fargs, args.repeats, budget))
    after = device_memory()
    row["device_memory_before"], row["device_memory_after"] = before, after
    # The allocator's peak is over the whole process: it is this case's own peak only when this
    # case raised it.
    if after and before:
        row["peak_bytes_in_use"] = after.get("peak_bytes_in_use")
        row["peak_is_this_case"] = after.get("peak_bytes_in_use", 0) > before.get(
            "peak_bytes_in_use", 0
        )
    else:
        row["peak_bytes_in_use"] = None
    row["images_per_s"] = batch / row["steady_s"]
    row["status"] = "ran" if row["finite"] else "ran: output not finite"
    return row


def throughput(models, args, clock, cache, reserve_fn) -> list[dict]:
    rows = []
    for batch in args.batches:
        for dtype in args.dtypes:
            for mode in ("exact", "forward"):
                compile_s, run_s = estimates(rows, mode, dtype, batch)
                reserve_s = reserve_fn(rows)
                decision = plan_case(clock.left(), reserve_s, compile_s, run_s, mode)
                row = {"mode": mode, "score_dtype": dtype, "batch": batch, "decision": decision}
                row["estimates_s"] = {"compile": compile_s, "run": run_s, "reserve": reserve_s}
                try:
                    throughput_case(row, models, args, clock, reserve_s, run_s)
                except Exception as e:  # e.g. out of device memory: keep going
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
                rows.append(row)
                if mode == "exact" and "xla_memory" in row:
                    cache[(dtype, batch)] = row["xla_memory"]
                print(f"[{clock.elapsed():6.0f} s] {brief(row)}", flush=True)
    return rows


def brief(r: dict) -> str:
    s = f"{r['score_dtype']} {r['mode']} b={r['batch']}: {r['status']}"
    if "steady_s" in r:
        s += f", {r['steady_s']:.3f} s, {r['images_per_s']:.2f} images/s"
    if "compile_s" in r:
        s += f", compile {r['compile_s']:.1f} s"
    return s


def add_flops(rows: list[dict], flops: dict, matmul: dict) -> dict:
    """FLOPs, FLOP/s and utilisation per row. Checks that the compiled forward's count covers one
    step (the loop body once): if it covered all steps, the as-compiled counts are used."""
    n = flops["n_steps"]
    ratios = [
        r["xla_flops_as_compiled"] / (r["batch"] * flops["net_per_image"])
        for r in rows
        if r["mode"] == "forward" and r.get("xla_flops_as_compiled")
    ]
    once = not ratios or n == 1 or ratios[0] < (n + 1) / 2
    for r in rows:
        if r["mode"] == "forward" and r.get("xla_flops_as_compiled"):
            r["as_compiled_flops_over_one_step"] = r["xla_flops_as_compiled"] / (
                r["batch"] * flops["net_per_image"]
            )
        if once:
            r["flops"] = r["batch"] * flops[f"{r['mode']}_per_image"]
        else:
            r["flops"] = r.get("xla_flops_as_compiled")
        if "steady_s" in r and r["flops"]:
            r["flops_per_s"] = r["flops"] / r["steady_s"]
            peak = matmul.get(r["score_dtype"], {}).get("flops_per_s")
            r["utilisation"] = r["flops_per_s"] / peak if peak else None
    return {"loop_body_counted_once": once, "as_compiled_over_one_step": ratios}


# --------------------------------------------------------------------------------------------
# part 2: AutoAttack-rand


def autoattack(rows: list[dict], flops: dict | None, args) -> dict:
    n_grads = args.n_images * 2 * args.n_iter * args.eot
    official_gpu_h = OFFICIAL["wall_h"] * OFFICIAL["gpus"]
    out = {
        "method": (
            "derived, not timed: one APGD-EOT iteration with EOT E is one eot_value_and_grad, "
            "i.e. one exact gradient per image and draw (vmapped over the draws), so it costs E "
            "x (seconds per image of the exact gradient at part 1's best throughput); APGD's "
            "own update arithmetic and the clean/final checks are left out"
        ),
        "workload": {
            "images": args.n_images,
            "attacks": ["apgd-ce", "apgd-dlr"],
            "n_iter": args.n_iter,
            "eot": args.eot,
            "exact_gradients": n_grads,
            "upper_bound": "every image attacked by both attacks (AutoAttack only attacks the "
            "still-robust ones)",
        },
        "official": {
            **OFFICIAL,
            "source": "DiffPure issue #28 (CIFAR-10 ResNet-50, rand, APGD-DLR), via "
            "../shared/background/diffpure_official.md",
            "gpu_hours": official_gpu_h,
            "gpu_hours_per_image": official_gpu_h / OFFICIAL["images"],
            "gpu_hours_scaled_to_images": official_gpu_h * args.n_images / OFFICIAL["images"],
        },
        "by_dtype": {},
    }
    for dtype in args.dtypes:
        timed = [
            r
            for r in rows
            if r["mode"] == "exact" and r["score_dtype"] == dtype and "steady_s" in r
        ]
        if not timed:
            out["by_dtype"][dtype] = {"status": "no exact-gradient run"}
            continue
        best = max(timed, key=lambda r: r["images_per_s"])
        s_grad = 1.0 / best["images_per_s"]
        hours = n_grads * s_grad / 3600
        out["by_dtype"][dtype] = {
            "from_batch": best["batch"],
            "s_per_exact_gradient_per_image": s_grad,
            "s_per_apgd_iteration_per_image": args.eot * s_grad,
            "images_per_apgd_call_at_that_batch": best["batch"] / args.eot,
            "n_steps": best["n_steps"],
            "device_hours": hours,
            "node_hours_8_devices": hours / 8,
            "total_flops": None if flops is None else n_grads * flops["exact_per_image"],
            "official_gpu_hours_scaled_over_ours": out["official"]["gpu_hours_scaled_to_images"]
            / hours,
        }
    return out


# --------------------------------------------------------------------------------------------
# part 3: sizing (compile only) and the sharded program


def fit_max_batch(points: list[dict], capacities: dict[str, float]) -> dict:
    """The largest batch per capacity, from the line through the two largest batches' bytes (the
    marginal cost per image where it matters: memory grows a little less than linearly); the
    line's largest relative error at the other points is the linearity check."""
    pts = sorted((p["batch"], p["need_bytes"]) for p in points if p.get("need_bytes"))
    if len(pts) < 2:
        return {"error": f"{len(pts)} point(s): a fit needs 2"}
    (b0, n0), (b1, n1) = pts[-2:]
    slope = (n1 - n0) / (b1 - b0)
    intercept = n1 - slope * b1
    residual = max(abs(n - (slope * b + intercept)) / n for b, n in pts)
    out = {
        "method": "line through the two largest batches",
        "bytes_per_image": float(slope),
        "intercept_bytes": float(intercept),
        "max_relative_residual": float(residual),
        "max_batch": {},
    }
    for name, cap in capacities.items():
        out["max_batch"][name] = int((cap - intercept) // slope) if slope > 0 else None
    return out


def sizing(args, cache: dict, clock: Clock, compile_est: float) -> dict:
    config0 = PurifyConfig(t_star=args.t_star, dt=args.dt, grad="exact")
    capacities = dict(CAPACITIES)
    limit = (device_memory() or {}).get("bytes_limit")
    if limit:
        capacities["this device (bytes_limit)"] = float(limit)
    out = {
        "method": "XLA's compiled memory (arguments + outputs + temp - aliased) of the exact "
        "gradient at a few batches, extrapolated linearly (fit_max_batch); each point compiled "
        "only, with abstract weights, or taken from part 1's compile of the same program",
        "backend": jax.default_backend(),
        "n_steps": config0.n_steps,
        "capacities_bytes": capacities,
        "by_dtype": {},
    }
    models = build(args.tiny, args.classifier, abstract=True)
    for dtype in args.sizing_dtypes:
        config = PurifyConfig(t_star=args.t_star, dt=args.dt, grad="exact", score_dtype=dtype)
        points = []
        for batch in args.sizing_batches:
            p = {"batch": batch}
            if (dtype, batch) in cache:
                p.update(source="part 1 compile", xla_memory=cache[(dtype, batch)])
            elif clock.left() < compile_est:
                p["source"] = "skipped: --budget-s"
            else:
                try:
                    t = time.perf_counter()
                    fargs = (defended(models, config), *case_inputs(batch, abstract=True))
                    compiled = jax.jit(exact_case).lower(*fargs).compile()
                    p.update(source="compile only", compile_s=time.perf_counter() - t)
                    p["xla_memory"] = common.memory_analysis(compiled)
                    del compiled
                except Exception as e:
                    p["source"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            if "xla_memory" in p:
                p["need_bytes"] = need_bytes(p["xla_memory"])
            points.append(p)
            need = p.get("need_bytes")
            print(
                f"[{clock.elapsed():6.0f} s] sizing {dtype} b={batch}: "
                f"{'-' if need is None else f'{need / GB:.2f} GB'} ({p['source']})",
                flush=True,
            )
        out["by_dtype"][dtype] = {"points": points, "fit": fit_max_batch(points, capacities)}
        fit = out["by_dtype"][dtype]["fit"]
        if "max_batch" in fit:
            fit["max_images_per_apgd_call_eot"] = {
                k: None if v is None else v // args.eot for k, v in fit["max_batch"].items()
            }
    return out


def sharded_memory(args) -> dict:
    """Per-device XLA memory of the exact gradient of --sharded-batch split over a 1-D `data`
    mesh of the first --sharded-devices devices (model replicated, abstract weights), and the
    one-device program at the per-device batch."""
    from diffpure_jax import sharding

    n = args.sharded_devices
    devices = jax.devices()[:n]
    if len(devices) < n:
        return {"error": f"{len(devices)} devices, need {n}"}
    if args.sharded_batch % n:
        return {"error": f"--sharded-batch {args.sharded_batch} is not a multiple of {n}"}
    mesh = sharding.data_mesh(devices)
    rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    config = PurifyConfig(t_star=args.t_star, dt=args.dt, grad="exact")
    model = defended(build(args.tiny, args.classifier, abstract=True), config)

    def place(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)

    out = {
        "n_devices": len(devices),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "global_batch": args.sharded_batch,
        "per_device_batch": args.sharded_batch // n,
        "score_dtype": "float32",
        "n_steps": config.n_steps,
    }
    t = time.perf_counter()
    sharded_args = (jax.tree.map(place, model), *case_inputs(args.sharded_batch, True, split, rep))
    compiled = jax.jit(exact_case).lower(*sharded_args).compile()
    out["compile_s"] = time.perf_counter() - t
    out["per_device_xla_memory"] = common.memory_analysis(compiled)
    out["per_device_need_bytes"] = need_bytes(out["per_device_xla_memory"])
    out["output_sharding"] = str(compiled.output_shardings)
    del compiled
    t = time.perf_counter()
    one = jax.jit(exact_case).lower(model, *case_inputs(out["per_device_batch"], True)).compile()
    out["one_device_compile_s"] = time.perf_counter() - t
    out["one_device_xla_memory_at_per_device_batch"] = common.memory_analysis(one)
    ref = need_bytes(out["one_device_xla_memory_at_per_device_batch"])
    out["per_device_over_one_device"] = (
        out["per_device_need_bytes"] / ref if ref and out["per_device_need_bytes"] else None
    )
    return out


def worker_command(args, out_path: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--sharded-worker", "--out", out_path]
    cmd += ["--t-star", str(args.t_star), "--dt", str(args.dt)]
    cmd += ["--sharded-batch", str(args.sharded_batch)]
    cmd += ["--sharded-devices", str(args.sharded_devices)]
    return cmd + (["--tiny"] if args.tiny else [])


class Sharded:
    """The sharded compile: in this process when it has enough accelerators, else a subprocess
    on forced CPU devices (started early when it does not compete with timed CPU work)."""

    def __init__(self, args):
        self.args, self.proc, self.result = args, None, None
        n = args.sharded_devices
        self.in_process = jax.default_backend() != "cpu" and jax.device_count() >= n

    def start(self):
        if self.in_process or self.proc is not None:
            return
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        flag = f"--xla_force_host_platform_device_count={self.args.sharded_devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
        env.pop("JAX_NUM_CPU_DEVICES", None)
        self.tmp = tempfile.mkdtemp(prefix="accelerator_sharded_")
        self.log = open(os.path.join(self.tmp, "log.txt"), "w")  # noqa: SIM115
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            worker_command(self.args, os.path.join(self.tmp, "out.json")),
            cwd=common.REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def finish(self, wait_s: float) -> dict:
        if self.in_process:
            try:
                return {**sharded_memory(self.args), "where": "this process, real devices"}
            except Exception as e:
                return {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        self.start()
        try:
            rc = self.proc.wait(timeout=min(self.args.sharded_timeout_s, max(wait_s, 30.0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "timeout"
        self.log.close()
        path = os.path.join(self.tmp, "out.json")
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            result["where"] = "subprocess, forced CPU devices: the CPU compiler's figures"
        else:
            with open(os.path.join(self.tmp, "log.txt")) as f:
                result = {"error": f"worker exit {rc}", "log_tail": f.read()[-3000:]}
        shutil.rmtree(self.tmp, ignore_errors=True)
        result["worker_wall_s"] = time.perf_counter() - self.t0
        result["command"] = " ".join(worker_command(self.args, "OUT"))
        return result


# --------------------------------------------------------------------------------------------
# report


def fmt_gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:.2f}"


def tables(payload: dict) -> str:
    parts = []
    rows = payload.get("throughput", [])
    if rows:
        body = []
        for r in rows:
            m = r.get("xla_memory", {})
            body.append(
                [
                    r["score_dtype"],
                    r["mode"],
                    r["batch"],
                    f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                    f"{r['steady_s'] * 1e3:.1f}" if "steady_s" in r else "-",
                    f"{r['images_per_s']:.2f}" if "images_per_s" in r else "-",
                    fmt_gb(m.get("temp_size_in_bytes")),
                    fmt_gb(m.get("argument_size_in_bytes")),
                    fmt_gb(r.get("peak_bytes_in_use")),
                    f"{r['flops'] / r['batch'] / 1e12:.3f}" if r.get("flops") else "-",
                    f"{r['flops_per_s'] / 1e12:.2f}" if r.get("flops_per_s") else "-",
                    f"{r['utilisation']:.3f}" if r.get("utilisation") else "-",
                    r["status"],
                ]
            )
        cols = ["dtype", "mode", "batch", "compile (s)", "steady (ms)", "images/s"]
        cols += ["XLA temp (GB)", "XLA args (GB)", "peak (GB)", "TFLOP / image", "TFLOP/s"]
        cols += ["/ matmul", "status"]
        parts.append(common.markdown_table(cols, body))
    aa = payload.get("autoattack")
    if aa:
        body = []
        for dtype, d in aa["by_dtype"].items():
            if "device_hours" not in d:
                body.append([dtype, "-", "-", "-", "-", "-", d["status"]])
                continue
            body.append(
                [
                    dtype,
                    d["from_batch"],
                    f"{d['s_per_exact_gradient_per_image']:.3g}",
                    f"{d['s_per_apgd_iteration_per_image']:.3g}",
                    f"{d['device_hours']:.3g}",
                    f"{d['official_gpu_hours_scaled_over_ours']:.3g}",
                    "derived from the gradient throughput",
                ]
            )
        cols = ["dtype", "batch", "s / gradient / image", f"s / APGD iteration / image (EOT "
                f"{aa['workload']['eot']})", f"device-hours, {aa['workload']['images']} images",
                "official A100-hours (scaled) / ours", "how"]  # fmt: skip
        parts.append(common.markdown_table(cols, body))
        o = aa["official"]
        parts.append(
            f"Official: {o['wall_h']:.0f} h on {o['gpus']} {o['gpu']}s for {o['images']} images "
            f"({o['grad']}) = {o['gpu_hours']:.0f} GPU-hours, "
            f"{o['gpu_hours_scaled_to_images']:.0f} scaled to {aa['workload']['images']} images."
        )
    sz = payload.get("sizing")
    if sz:
        body = []
        for dtype, d in sz["by_dtype"].items():
            fit = d["fit"]
            for p in d["points"]:
                m = p.get("xla_memory", {})
                body.append(
                    [
                        dtype,
                        p["batch"],
                        fmt_gb(m.get("argument_size_in_bytes")),
                        fmt_gb(m.get("temp_size_in_bytes")),
                        fmt_gb(p.get("need_bytes")),
                        p["source"],
                    ]
                )
            if "max_batch" in fit:
                fits = ", ".join(f"{k}: {v}" for k, v in fit["max_batch"].items())
                body.append(
                    [
                        dtype,
                        "fit",
                        "-",
                        f"{fit['bytes_per_image'] / GB:.3f} / image",
                        "-",
                        f"largest batch {fits}",
                    ]  # fmt: skip
                )
            else:
                body.append([dtype, "fit", "-", "-", "-", fit["error"]])
        cols = ["dtype", "batch", "args (GB)", "temp (GB)", "total (GB)", "source"]
        parts.append(common.markdown_table(cols, body))
    sh = payload.get("sharded")
    if sh:
        if "per_device_xla_memory" in sh:
            m = sh["per_device_xla_memory"]
            one = sh["one_device_xla_memory_at_per_device_batch"]
            parts.append(
                common.markdown_table(
                    [
                        "devices",
                        "global batch",
                        "per device",
                        "per-device args (GB)",
                        "per-device temp (GB)",
                        "1 device at per-device batch: temp (GB)",
                        "where",
                    ],
                    [
                        [
                            sh["n_devices"],
                            sh["global_batch"],
                            sh["per_device_batch"],
                            fmt_gb(m.get("argument_size_in_bytes")),
                            fmt_gb(m.get("temp_size_in_bytes")),
                            fmt_gb(one.get("temp_size_in_bytes")),
                            sh["where"],
                        ]
                    ],
                )  # fmt: skip
            )
        else:
            parts.append(f"sharded: {sh.get('error')}")
    return "\n\n".join(parts)


def default_out(args) -> Path:
    suffix = "_tiny" if args.tiny else "_sizing" if args.sizing_only else ""
    return common.RESULTS / f"accelerator_{jax.default_backend()}{suffix}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sharded_worker:
        common.write_json(args.out, sharded_memory(args))
        return 0
    out_path = Path(args.out) if args.out else default_out(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sharded_worker")}
    env = common.header("accelerator", settings)
    clock = Clock(args.budget_s)
    device = jax.devices()[0]
    payload = {
        "environment": env,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_memory_at_start": device_memory(),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "command": common.command("benchmarks.accelerator", argv),
        "config": settings,
        "models": "tiny NCSN++ " + str(TINY_SCORE) if args.tiny else "NCSN++ full (106.6M)",
        "classifier": f"WRN-{args.classifier[0]}-{args.classifier[1]}",
        "budget_s": args.budget_s,
    }
    sharded = Sharded(args) if args.sharded else None
    # The CPU subprocess disturbs no timing that matters on an accelerator, at tiny size or
    # with --sizing-only: start it now.
    if sharded is not None and (jax.default_backend() != "cpu" or args.tiny or args.sizing_only):
        sharded.start()
    cache: dict = {}
    rows: list[dict] = []
    if not args.sizing_only:
        models = jax.block_until_ready(build(args.tiny, args.classifier, abstract=False))
        payload["n_params"] = {"score": common.n_params(models[0].variables),
                               "classifier": common.n_params(models[1].variables)}  # fmt: skip
        payload["matmul"] = {d: matmul_reference(args.matmul_size, d, args.repeats)
                             for d in args.dtypes}  # fmt: skip
        config = PurifyConfig(t_star=args.t_star, dt=args.dt, grad="exact")
        try:
            payload["flops"] = flop_counts(models, config, args.batches[0])
        except Exception as e:
            payload["flops"] = None
            payload["flops_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"[{clock.elapsed():6.0f} s] matmul and FLOP counts done", flush=True)

        def reserve(rows: list[dict]) -> float:
            """Seconds part 3 needs: compiles for 2 sizing points per dtype not yet compiled or
            due in part 1, and the sharded compile when it runs after part 1 on this CPU."""
            est = estimates(rows, "exact", args.dtypes[0], 1)[0]
            due = {(d, b) for d in args.dtypes for b in args.batches}
            done = {(r["score_dtype"], r["batch"]) for r in rows if r["mode"] == "exact"}
            n = 0
            for d in args.sizing_dtypes:
                have = [b for b in args.sizing_batches if (d, b) in cache or (d, b) in due - done]
                n += max(0, min(2, len(args.sizing_batches)) - len(have))
            late = sharded is not None and sharded.proc is None
            return est * (n + (2 if late else 0))

        rows = throughput(models, args, clock, cache, reserve)
        payload["throughput"] = rows
        payload["skipped"] = [brief(r) for r in rows if not r["status"].startswith("ran")]
        if payload["flops"]:
            payload["flops"]["check"] = add_flops(rows, payload["flops"], payload["matmul"])
        payload["autoattack"] = autoattack(rows, payload["flops"], args)
        del models
        common.write_json(out_path, payload)
    compile_est = estimates(rows, "exact", args.dtypes[0], 1)[0] if rows else 0.0
    payload["sizing"] = sizing(args, cache, clock, compile_est)
    common.write_json(out_path, payload)
    if sharded is not None:
        payload["sharded"] = sharded.finish(clock.left() + 60.0)
    payload["total_s"] = clock.elapsed()
    payload["tables"] = tables(payload)
    print()
    print(payload["tables"])
    print(f"\ntotal {payload['total_s']:.0f} s (budget {args.budget_s:.0f} s)")
    common.write_json(out_path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
