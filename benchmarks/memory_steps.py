"""Memory of one input gradient through purification vs the number of steps (small NCSN++).

For n_steps in --steps (dt = 1e-3, t* = n dt; default 10, 100, 1000) and each gradient scheme:

* `exact`: grad='exact' with the library's default checkpoints (every state stored, n_steps);
* `exact-sqrt`: grad='exact' with equinox's own default number of checkpoints,
  floor(sqrt(2 n + 1/4) - 1/2), i.e. 4 / 13 / 44 states for 10 / 100 / 1000 steps (the
  library's default until 2026-12);
* `adjoint`: grad='adjoint' (continuous adjoint: O(1) states, the state reconstructed backwards);
* `scan-store-all`: a plain `lax.scan` Euler loop under `jax.grad` without checkpointing
  (common.scan_purify(remat=False)), i.e. what storing every step's network activations costs;

it records XLA's compiled memory analysis (temp buffers = everything the program allocates beyond
its arguments and outputs; this is the peak working memory of the compiled program on CPU), the
compile time, and (for n_steps <= --run-max-steps) the measured run time. Steps above
--run-max-steps are compiled and analysed but NOT run (stated in the output as `run: no`).

The estimate to compare against: one network step's VJP residuals (what reverse mode saves of
one score evaluation, from jax's saved-residuals analysis; network parameters excluded) times
n_steps.

    python -m benchmarks.memory_steps
    python -m benchmarks.memory_steps --steps 10,100,1000 --batch 2 --run-max-steps 1000

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

DEFAULT_OUT = common.RESULTS / "memory_steps.json"
SCHEMES = ("exact", "exact-sqrt", "adjoint", "scan-store-all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=list(common.MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", default="10,100,1000")
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--run-max-steps", type=int, default=100, help="run (time) only up to this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=20.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def step_residual_bytes(score, batch: int) -> dict:
    """Bytes reverse mode saves for one score evaluation (VJP in x), split by origin."""
    from jax._src.ad_checkpoint import saved_residuals  # jax's print_saved_residuals, as data

    x = jnp.zeros((batch, *common.IMAGE_SHAPE))
    t = jnp.full((batch,), 0.05)
    residuals = saved_residuals(lambda v, y: score.score_fn(v, y, t), score.variables, x)
    by_origin = {"activations": 0, "parameters": 0}
    for aval, origin in residuals:
        nbytes = int(aval.size * aval.dtype.itemsize)
        by_origin["parameters" if origin.startswith("from the argument v") else "activations"] += (
            nbytes
        )
    # The same, measured the other way: XLA's temp buffers of one network forward + VJP.
    w = jnp.ones_like(x)
    compiled, _ = common.compile_fn(jax.grad(lambda y, s: jnp.sum(w * s(y, t))), (x, score))
    by_origin["one_step_vjp_xla_temp"] = common.memory_analysis(compiled).get("temp_size_in_bytes")
    return by_origin


def case_fn(scheme: str, n_steps: int, dt: float):
    config = PurifyConfig(
        t_star=n_steps * dt,
        dt=dt,
        grad="adjoint" if scheme == "adjoint" else "exact",
        checkpoints=common.default_checkpoints(n_steps) if scheme == "exact-sqrt" else None,
    )
    if scheme == "scan-store-all":
        return common.scan_grad_fn(config, remat=False), config
    return common.grad_fn(config), config


def table(results, residual) -> str:
    rows = []
    act = residual["activations"]
    for r in results:
        mem = r.get("xla_memory", {})
        temp = mem.get("temp_size_in_bytes")
        rows.append(
            [
                r["n_steps"],
                r["scheme"],
                r["stored_states"],
                common.fmt_mb(temp),
                common.fmt_mb(act * r["n_steps"]),
                "-" if temp is None else f"{temp / (act * r['n_steps']):.3f}",
                f"{r['compile_s']:.1f}",
                "no" if r.get("steady_s") is None else f"{r['steady_s']:.2f}",
                "-" if r.get("steady_s") is None else f"{r['cpu_per_wall']:.2f}",
                "-" if r.get("steady_s") is None else common.fmt_load(r),
            ]
        )
    return common.markdown_table(
        [
            "steps",
            "scheme",
            "states stored",
            "XLA temp (MB)",
            "store-all estimate n x residuals (MB)",
            "temp / estimate",
            "compile (s)",
            "run (s)",
            "CPU/wall",
            "others CPU/wall",
        ],
        rows,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    schemes = args.schemes.split(",")
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "solver": "euler"}
    env = common.header("memory_steps", config)
    score = common.random_score(args.model)
    residual = step_residual_bytes(score, args.batch)
    state_bytes = args.batch * 32 * 32 * 3 * 4
    print(
        f"one step: VJP residuals {residual['activations'] / common.MB:.1f} MB activations "
        f"(+{residual['parameters'] / common.MB:.1f} MB parameters, shared by all steps); "
        f"XLA temp of one network VJP {common.fmt_mb(residual['one_step_vjp_xla_temp'])} MB; "
        f"one state {state_bytes / 1e3:.1f} kB",
        flush=True,
    )
    x, w, key = common.inputs(args.batch)
    results = []
    start = time.perf_counter()
    for n in steps:
        for scheme in schemes:
            fn, cfg = case_fn(scheme, n, args.dt)
            fargs = jax.block_until_ready((x, score, w, key))
            compiled, r = common.compile_fn(fn, fargs)
            r.update(
                n_steps=n,
                scheme=scheme,
                stored_states={
                    "exact": n,
                    "exact-sqrt": common.default_checkpoints(n),
                    "adjoint": 1,
                    "scan-store-all": n,
                }[scheme],
                xla_memory=common.memory_analysis(compiled),
                ran=n <= args.run_max_steps,
            )
            if r["ran"]:
                r.update(common.time_compiled(compiled, fargs, args.repeats, args.budget_s))
            del compiled
            results.append(r)
            temp = r["xla_memory"].get("temp_size_in_bytes")
            print(
                f"[{time.perf_counter() - start:6.0f} s] n={n} {scheme}: temp "
                f"{common.fmt_mb(temp)} MB, compile {r['compile_s']:.1f} s, "
                + (f"run {r['steady_s']:.2f} s" if r["ran"] else "not run"),
                flush=True,
            )
    total = time.perf_counter() - start
    print()
    print(table(results, residual))
    print(f"\ntotal {total:.0f} s")
    common.write_json(
        args.out,
        {
            "environment": env,
            "config": config,
            "command": common.command("benchmarks.memory_steps", argv),
            "one_step_residual_bytes": residual,
            "state_bytes": state_bytes,
            "results": results,
            "table": table(results, residual),
            "total_s": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
