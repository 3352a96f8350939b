"""Where the time of one score-network call goes: a per-operation profile of the compiled program.

Runs one NCSN++ call (or, with --vjp, one call and its VJP in x) on a batch under
`jax.profiler.trace(create_perfetto_trace=True)`, sums the duration of every executed XLA
operation (thunk) in the trace, and classifies each one from the compiled HLO (`as_text()`):

* `convolution` / `dot`: the fusions that contain one, with their FLOPs (2 x output elements x
  contraction size), grouped by kernel and output shape, so their FLOP/s can be set against a
  float32 matmul measured in the same run;
* `reduction`: fusions whose only non-trivial work is a reduce (GroupNorm statistics);
* `elementwise / copy`: everything else (normalisation, activations, adds, transposes, concats).

    python -m benchmarks.profile_ops --model full --batch 8
    python -m benchmarks.profile_ops --model small --batch 8 --vjp

On XLA:CPU every operation runs to completion before the next starts (one at a time, each using
the cores itself), so the durations add up to the wall time. Other backends overlap operations:
there the shares are of summed operation time. Results: benchmarks/README.md ("Where the time
goes") and benchmarks/results/profile_ops_<model>_<batch>[_vjp].json.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.accelerator import matmul_reference  # noqa: E402

# Trace events that are not XLA operations (executors, Python frames, thread-pool waits).
NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "end: ", "Common", "Parse")
NOT_OPS += ("Handle ",)
_SHAPE = r"\w+\[([\d,]*)\]"
_CONV = r"= (\w+\[[\d,]*\])\S* convolution\(%(\S+), %(\S+)\),.*?dim_labels=\w+_(\w+)->"
_DOT = r"= (\w+\[[\d,]*\])\S* dot\(%(\S+), %(\S+)\),.*?lhs_contracting_dims=\{([\d,]*)\}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="full", choices=list(common.MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vjp", action="store_true", help="profile a call and its VJP in x")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.batch < 1 or args.matmul_size < 1:
        p.error(
            f"--batch and --matmul-size must be at least 1, got {args.batch}, {args.matmul_size}"
        )
    return args


def _dims(text: str) -> list[int]:
    return [int(d) for d in re.search(_SHAPE, text).group(1).split(",") if d]


def computations(hlo: str) -> dict[str, tuple[dict[str, str], str]]:
    """name -> (parameter name -> shape text, body) of every non-entry computation."""
    out = {}
    for m in re.finditer(r"^%?([\w.\-]+) \((.*?)\) -> .*?\{\n(.*?)\n\}", hlo, re.M | re.S):
        params = dict(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", m.group(2)))
        out[m.group(1)] = (params, m.group(3))
    return out


def _operand_shape(name: str, params: dict, body: str) -> list[int] | None:
    if name in params:
        return _dims(params[name])
    m = re.search(r"%" + re.escape(name) + r" = (\w+\[[\d,]*\])", body)
    return _dims(m.group(1)) if m else None


def classify(params: dict, body: str) -> tuple[str, float, str]:
    """(kind, FLOPs, signature) of one fused computation's body."""
    flops, sigs = 0.0, []
    for line in body.split("\n"):
        conv = re.search(_CONV, line)
        if conv:
            out = _dims(conv.group(1))
            kernel = _operand_shape(conv.group(3), params, body)
            if kernel is None:
                continue
            labels = dict(zip(conv.group(4), kernel, strict=False))
            window = math.prod(v for c, v in labels.items() if c not in "io")
            flops += 2.0 * math.prod(out) * window * labels.get("i", 1)
            sigs.append(f"conv {'x'.join(map(str, kernel))} -> {'x'.join(map(str, out[1:]))}")
            continue
        dot = re.search(_DOT, line)
        if dot:
            out = _dims(dot.group(1))
            lhs = _operand_shape(dot.group(2), params, body)
            if lhs is None:
                continue
            k = math.prod(lhs[int(i)] for i in dot.group(4).split(",") if i)
            flops += 2.0 * math.prod(out) * k
            sigs.append(f"dot K={k} -> {'x'.join(map(str, out[1:]))}")
    if sigs:
        return ("convolution" if sigs[0].startswith("conv") else "dot"), flops, "; ".join(sigs)
    ops = set(re.findall(r"= \w+\[[\d,]*\]\S* ([\w\-]+)\(", body))
    if "reduce" in ops:
        return "reduction", 0.0, "reduce"
    return "elementwise / copy", 0.0, ""


def op_kinds(hlo: str) -> dict[str, tuple[str, float, str]]:
    """Every entry-computation instruction -> (kind, FLOPs, signature)."""
    comps = computations(hlo)
    kinds = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*", hlo, re.M):
        line, name = m.group(0), m.group(1)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called and called.group(1) in comps:
            kinds[name] = classify(*comps[called.group(1)])
        elif " convolution(" in line or " dot(" in line:
            kinds[name] = classify({}, line)
        else:
            kinds[name] = ("elementwise / copy", 0.0, "")
    return kinds


def trace_durations(logdir: str) -> dict[str, float]:
    """Operation name -> summed duration (s) from the perfetto trace under `logdir`."""
    path = sorted(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
            out[e["name"]] += e.get("dur", 0.0) * 1e-6
    return dict(out)


def profile(args) -> dict:
    score = common.random_score(args.model)
    x, w, _ = common.inputs(args.batch)
    t = jnp.full((args.batch,), 0.05)
    if args.vjp:
        fn, fargs = jax.grad(lambda z, s, w: jnp.sum(w * s(z, t))), (2 * x - 1, score, w)
    else:
        fn, fargs = (lambda s, z: s(z, t)), (score, 2 * x - 1)
    compiled, _ = common.compile_fn(fn, fargs)
    timing = common.time_compiled(compiled, fargs, 3, 60.0)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*fargs))
        durations = trace_durations(logdir)
    kinds = op_kinds(compiled.as_text())
    groups: dict[tuple[str, str], dict] = {}
    for name, seconds in durations.items():
        kind, flops, sig = kinds.get(name, ("elementwise / copy", 0.0, ""))
        g = groups.setdefault((kind, sig), {"kind": kind, "signature": sig, "count": 0})
        g["count"] += 1
        g["seconds"] = g.get("seconds", 0.0) + seconds
        g["flops"] = g.get("flops", 0.0) + flops
    return {
        "timing": timing,
        "xla_flops": common.cost_analysis(compiled).get("flops"),
        "ops_seconds": sum(durations.values()),
        "n_ops": len(durations),
        "groups": sorted(groups.values(), key=lambda g: -g["seconds"]),
    }


def tables(result: dict, matmul: dict) -> str:
    peak, total = matmul["flops_per_s"], result["ops_seconds"]
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for g in result["groups"]:
        k = by_kind[g["kind"]]
        k[0], k[1], k[2] = k[0] + g["count"], k[1] + g["seconds"], k[2] + g["flops"]

    def rate(flops, secs):
        return (
            ("-", "-") if not flops else (f"{flops / secs / 1e9:.0f}", f"{flops / secs / peak:.2f}")
        )

    summary = [
        [kind, n, f"{secs * 1e3:.0f}", f"{100 * secs / total:.0f}%", *rate(flops, secs)]
        for kind, (n, secs, flops) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])
    ]
    top = [
        [g["kind"], g["signature"] or "-", g["count"], f"{g['seconds'] * 1e3:.1f}",
         f"{100 * g['seconds'] / total:.1f}%", *rate(g["flops"], g["seconds"])]
        for g in result["groups"][:15]
    ]  # fmt: skip
    cols = ["kind", "ops", "ms", "share", "GFLOP/s", "/ matmul"]
    return (
        common.markdown_table(cols, summary)
        + "\n\n"
        + common.markdown_table(["kind", "shapes (kernel -> output)", *cols[1:]], top)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("profile_ops", settings)
    matmul = matmul_reference(args.matmul_size, "float32", 5)
    result = profile(args)
    text = tables(result, matmul)
    print(text)
    print(
        f"steady {result['timing']['steady_s'] * 1e3:.0f} ms; operations add up to "
        f"{result['ops_seconds'] * 1e3:.0f} ms ({result['n_ops']} ops); matmul "
        f"{matmul['flops_per_s'] / 1e9:.0f} GFLOP/s"
    )
    name = f"profile_ops_{args.model}_{args.batch}{'_vjp' if args.vjp else ''}.json"
    payload = {"environment": env, "command": common.command("benchmarks.profile_ops", argv)}
    payload.update(config=settings, matmul=matmul, result=result, tables=text)
    common.write_json(args.out or common.RESULTS / name, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
