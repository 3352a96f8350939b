"""The headline table: what purification, its exact gradient and one AutoAttack-rand iteration
cost, and how much of the device they use, measured in one sitting.

For each model group (`small`: the reference-sized NCSN++ (nf 16) + WRN-16-2 at DiffPure's
CIFAR-10 defaults, t* = 0.1, dt = 1e-3, 100 steps; `full`: score_sde's full-size NCSN++ (106.6M)
+ WRN-28-10 at t* = 0.005, 5 steps, to keep a CPU run short; random weights, which do not change
the cost), at one batch (default 8 images):

* `net-forward`, `net-vjp`: one score-network call, and one call with its VJP in x (loop-free);
* `forward`: one purification (`purify`, grid Brownian path);
* `exact`: d sum(w * purify(x)) / dx, `grad='exact'` with the library's default checkpoints
  (every state kept); `exact-sqrt`: the same with equinox's floor(sqrt(2 n + 1/4) - 1/2) states
  (the default until 2026-12); `adjoint`: `grad='adjoint'`;
* `apgd`: one iteration of APGD-CE (AutoAttack rand's first attack, Linf 8/255) through the
  defended classifier, batch / eot images x `--eot` draws (the draws are one vmapped batch, so
  the purifier sees `batch` images as in the other rows): the difference of compiled APGD runs
  with n_iter = 3 and 2 (each iteration is one EOT-averaged loss and gradient). Not 2 and 1:
  XLA inlines a loop of one trip and then drops the backward pass of its last iteration, whose
  gradient nothing uses, so that difference would count about a gradient and a half.

Columns: time (minimum over --repeats after a warm-up, `common.time_compiled`), x forward (time
over the group's `forward`), FLOPs (XLA's cost analysis per network call times the calls: a
compiled loop's body is counted once, see utilization.py; recomputed forward steps counted with
a callback), achieved FLOP/s over the FLOP/s of a float32 n x n matmul (`--matmul-size`) measured
right before each case (also at the start and the end of the run, to show the drift), and XLA's
compiled memory (arguments + outputs + temporaries; no execution needed).

    python -m benchmarks.headline                     # ~19 min on the 2-core CPU
    python -m benchmarks.headline --groups small      # ~7 min
    python -m benchmarks.headline --tiny              # seconds: the test that keeps it working
    python -m benchmarks.headline --groups small --interleaved   # forward and exact alternately

Results: benchmarks/README.md (the table at the top) and benchmarks/results/headline_<device>.json.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.accelerator import flop_counts, matmul_reference, need_bytes  # noqa: E402
from benchmarks.utilization import recompute_count  # noqa: E402
from diffpure_jax import DefendedClassifier, Purifier, PurifyConfig  # noqa: E402
from diffpure_jax.attacks.apgd import apgd  # noqa: E402
from diffpure_jax.attacks.base import Threat, bind_index  # noqa: E402

GROUPS = {
    "small": dict(score="small", classifier=(16, 2), t_star=0.1),
    "full": dict(score="full", classifier=(28, 10), t_star=0.005),
    "tiny": dict(score="tiny", classifier=(10, 1), t_star=0.003),
}
CASES = ("net-forward", "net-vjp", "forward", "exact", "exact-sqrt", "adjoint", "apgd")
GROUP_CASES = {
    "small": CASES,
    "full": ("net-forward", "net-vjp", "forward", "exact", "apgd"),
    "tiny": CASES,
}
WHAT = {
    "net-forward": "score network, 1 call",
    "net-vjp": "score network + VJP, 1 call",
    "forward": "purification",
    "exact": "exact gradient (default: every state kept)",
    "exact-sqrt": "exact gradient, sqrt(2n) states (old default)",
    "adjoint": "adjoint gradient",
    "apgd": "one APGD-EOT iteration (AutoAttack rand)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--groups", default="small,full", help=f"of {tuple(GROUPS)}")
    p.add_argument("--tiny", action="store_true", help="the tiny group only, matmul 256")
    p.add_argument("--batch", type=int, default=8, help="images per purification")
    p.add_argument("--eot", type=int, default=2, help="APGD's EOT draws (divides --batch)")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--matmul-size", type=int, help="2048 on a CPU, 8192 on an accelerator")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=60.0, help="timed seconds per case")
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="only time the groups' forward and "
        "exact gradient alternately (--rounds each); writes headline_<platform>_interleaved.json",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", help="default benchmarks/results/headline_<platform>.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.groups, args.matmul_size, args.repeats = "tiny", 256, 1
    if args.matmul_size is None:
        args.matmul_size = 2048 if jax.default_backend() == "cpu" else 8192
    args.groups = args.groups.split(",")
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown groups {unknown}; choose from {tuple(GROUPS)}")
    small = [f"--{k.replace('_', '-')} {v}" for k in ("batch", "eot", "repeats", "rounds")
             if (v := getattr(args, k)) < 1]  # fmt: skip
    if small:
        p.error(f"must be at least 1: {', '.join(small)}")
    if args.batch % args.eot:
        p.error(f"--eot {args.eot} must divide --batch {args.batch}")
    return args


def flops(score, classifier, config: PurifyConfig, batch: int) -> dict:
    """FLOPs on `batch` images of one network call, one call + VJP, and the classifier's CE +
    VJP (`accelerator.flop_counts`, per image there)."""
    f = flop_counts((score, classifier), config, batch)
    keys = {"net": "net_per_image", "net_vjp": "net_vjp_per_image"}
    keys["classifier_vjp"] = "classifier_vjp_per_image"
    return {k: batch * f[v] for k, v in keys.items()}


def gradient_flops(f: dict, config: PurifyConfig) -> tuple[float, int]:
    """(FLOPs, recomputed forward steps) of one exact or adjoint gradient of a purification:
    the primal solve (n calls), per step one call + VJP in the backward pass, and the forward
    steps recomputed between checkpoints (counted on a cheap score; 0 for the adjoint)."""
    n = config.n_steps
    recompute = max(0, recompute_count(config) - 2 * n) if config.grad == "exact" else 0
    return n * (f["net"] + f["net_vjp"]) + recompute * f["net"], recompute


def programs(case: str, score, classifier, base: PurifyConfig, args):
    """(function, arguments) to compile for a case; `apgd` gives two (n_iter 2 and 3)."""
    x, w, key = common.inputs(args.batch)
    t = jnp.full((args.batch,), 0.5 * base.t_star)
    if case == "net-forward":
        return [(lambda s, z: s(z, t), (score, 2 * x - 1))]
    if case == "net-vjp":
        return [(jax.grad(lambda z, s, w: jnp.sum(w * s(z, t))), (2 * x - 1, score, w))]
    if case == "forward":
        return [(common.purify_fn(base), (score, x, key))]
    if case in ("exact", "exact-sqrt", "adjoint"):
        return [(common.grad_fn(config_of(case, base)), (x, score, w, key))]
    # apgd: batch / eot images, eot draws each; labels = the defended model's prediction in
    # APGD's own clean pass, so that no example starts misclassified.
    b = args.batch // args.eot
    model = DefendedClassifier(Purifier(score, base), classifier)
    xa = x[:b]
    y = jnp.argmax(bind_index(model, jnp.arange(b))(xa, jax.random.split(key, 3)[0]), -1)
    threat = Threat("Linf", 8 / 255)

    def run(n_iter):
        def f(model, x, y, key):
            m = bind_index(model, jnp.arange(x.shape[0]))
            return apgd(m, x, y, key, threat=threat, n_iter=n_iter, n_eot=args.eot).x_adv

        return f, (model, xa, y, key)

    return [run(2), run(3)]


def config_of(case: str, base: PurifyConfig) -> PurifyConfig:
    if case == "exact-sqrt":
        return dataclasses.replace(base, checkpoints=common.default_checkpoints(base.n_steps))
    if case == "adjoint":
        return dataclasses.replace(base, grad="adjoint")
    return base


def run_case(case: str, score, classifier, base: PurifyConfig, f: dict, args) -> dict:
    row = {"case": case, "what": WHAT[case], "batch": args.batch}
    row["n_steps"] = 1 if case.startswith("net") else base.n_steps
    if case == "apgd":
        row.update(images=args.batch // args.eot, eot=args.eot)
    # The reference, measured right before the case: this machine's speed drifts (up to 20%
    # within one sitting), so a matmul from the start of the run would not be the same run's.
    row["matmul"] = matmul_reference(args.matmul_size, "float32", 5)
    timed = []
    for fn, fargs in programs(case, score, classifier, base, args):
        fargs = jax.block_until_ready(fargs)
        compiled, timing = common.compile_fn(fn, fargs)
        res = common.time_compiled(compiled, fargs, args.repeats, args.budget_s)
        res.update(timing, xla_memory=common.memory_analysis(compiled))
        timed.append(res)
    last = timed[-1]
    row["compile_s"] = sum(r["compile_s"] for r in timed)
    row["runs"] = timed
    row["steady_s"] = last["steady_s"] - (timed[0]["steady_s"] if case == "apgd" else 0.0)
    row["need_bytes"] = need_bytes(last["xla_memory"])
    row["others_cpu_per_wall"] = max(r["others_cpu_per_wall"] or 0.0 for r in timed)
    row["finite"] = all(r["finite"] for r in timed)
    n = base.n_steps
    if case == "net-forward":
        row["flops"] = f["net"]
    elif case == "net-vjp":
        row["flops"] = f["net_vjp"]
    elif case == "forward":
        row["flops"] = n * f["net"]
    else:
        grad_flops, row["recompute_forward_steps"] = gradient_flops(f, config_of(case, base))
        row["flops"] = grad_flops + (f["classifier_vjp"] if case == "apgd" else 0.0)
    return row


def group(name: str, args, start: float) -> dict:
    spec = GROUPS[name]
    score = common.random_score(spec["score"])
    classifier = common.random_classifier(*spec["classifier"])
    base = PurifyConfig(t_star=spec["t_star"], dt=args.dt)
    f = flops(score, classifier, base, args.batch)
    out = {
        "group": name,
        "score": spec["score"],
        "score_params": common.n_params(score.variables),
        "classifier": "WRN-{}-{}".format(*spec["classifier"]),
        "classifier_params": common.n_params(classifier.variables),
        "t_star": base.t_star,
        "n_steps": base.n_steps,
        "flops_per_call": f,
        "rows": [],
    }
    for case in GROUP_CASES[name]:
        row = run_case(case, score, classifier, base, f, args)
        out["rows"].append(row)
        print(
            f"[{time.perf_counter() - start:6.0f} s] {name} {case}: {row['steady_s']:.3f} s, "
            f"{row['flops'] / 1e9:.1f} GFLOP, compile {row['compile_s']:.1f} s",
            flush=True,
        )
    fwd = next(r for r in out["rows"] if r["case"] == "forward")["steady_s"]
    for r in out["rows"]:
        r["x_forward"] = None if r["case"].startswith("net") else r["steady_s"] / fwd
    return out


def interleaved(name: str, args) -> dict:
    """The group's purification and exact gradient timed alternately, `--rounds` times each:
    both minimums come from the same minutes, so their ratio is not moved by the machine's
    speed drifting between cases (it does, by up to 20%, within a sitting here)."""
    spec = GROUPS[name]
    score = common.random_score(spec["score"])
    base = PurifyConfig(t_star=spec["t_star"], dt=args.dt)
    compiled = {}
    for case in ("forward", "exact"):
        ((fn, fargs),) = programs(case, score, None, base, args)
        fargs = jax.block_until_ready(fargs)
        compiled[case] = (common.compile_fn(fn, fargs)[0], fargs)
        jax.block_until_ready(compiled[case][0](*fargs))  # warm-up
    runs: dict[str, list[float]] = {"forward": [], "exact": []}
    for _ in range(args.rounds):
        for case, (c, fargs) in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*fargs))
            runs[case].append(time.perf_counter() - t)
    best = {case: min(v) for case, v in runs.items()}
    return {
        "group": name,
        "runs_s": runs,
        "min_s": best,
        "x_forward": best["exact"] / best["forward"],
    }


def add_utilisation(groups: list[dict]) -> None:
    """FLOP/s of each row, and their ratio to the matmul measured right before it."""
    for g in groups:
        for r in g["rows"]:
            r["flops_per_s"] = r["flops"] / r["steady_s"]
            r["utilisation"] = r["flops_per_s"] / r["matmul"]["flops_per_s"]


def table(payload: dict) -> str:
    rows = []
    for g in payload["groups"]:
        for r in g["rows"]:
            batch = f"{r['images']} x {r['eot']} EOT" if r["case"] == "apgd" else r["batch"]
            rows.append(
                [
                    f"{g['score']} NCSN++ + {g['classifier']}",
                    r["what"],
                    batch,
                    r["n_steps"],
                    f"{r['steady_s']:.3f}",
                    "-" if r["x_forward"] is None else f"{r['x_forward']:.2f}",
                    f"{r['flops'] / 1e9:.1f}",
                    f"{r['flops_per_s'] / 1e9:.1f}",
                    f"{r['matmul']['flops_per_s'] / 1e9:.0f}",
                    f"{r['utilisation']:.2f}",
                    common.fmt_mb(r["need_bytes"]),
                    f"{r['others_cpu_per_wall']:.2f}",
                ]
            )
    cols = ["model", "case", "batch", "steps", "time (s)", "x forward", "GFLOP", "GFLOP/s"]
    cols += ["matmul GFLOP/s", "utilisation", "memory (MB)", "others CPU/wall"]
    return common.markdown_table(cols, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("headline", settings)
    start = time.perf_counter()
    platform = jax.devices()[0].platform
    tag = ("_tiny" if args.tiny else "") + ("_interleaved" if args.interleaved else "")
    out = args.out or common.RESULTS / f"headline_{platform}{tag}.json"
    if args.interleaved:
        results = []
        for name in args.groups:
            results.append(interleaved(name, args))
            r = results[-1]
            fwd, exact = r["min_s"]["forward"], r["min_s"]["exact"]
            print(f"{name}: forward {fwd:.3f} s, exact {exact:.3f} s, {r['x_forward']:.2f}x")
        payload = {"environment": env, "command": common.command("benchmarks.headline", argv)}
        common.write_json(out, {**payload, "config": settings, "interleaved": results})
        return 0
    payload = {
        "environment": env,
        "command": common.command("benchmarks.headline", argv),
        "config": settings,
        "matmul": matmul_reference(args.matmul_size, "float32", 5),
        "groups": [],
    }
    mm = payload["matmul"]
    print(f"matmul {mm['n']}^2 float32: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    for name in args.groups:
        payload["groups"].append(group(name, args, start))
        add_utilisation(payload["groups"])
        common.write_json(out, payload)  # what is measured so far survives a kill
    payload["matmul_end"] = matmul_reference(args.matmul_size, "float32", 5)
    payload["total_s"] = time.perf_counter() - start
    payload["table"] = table(payload)
    print()
    print(payload["table"])
    print(
        f"matmul at the start {mm['flops_per_s'] / 1e9:.1f}, at the end "
        f"{payload['matmul_end']['flops_per_s'] / 1e9:.1f} GFLOP/s; total "
        f"{payload['total_s']:.0f} s"
    )
    common.write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
