"""Cost of DiffPure's CelebA-HQ DDPM purification (`diffpure_jax.ddpm`) at the small size.

The reference small SDEdit/DDPM UNet (64 x 64, ch 32, ch_mult 1,1,2, one residual block per
level, attention at 16; 0.81M params; random weights, which do not change the cost), batch
--batch (default 1), t* = --t-star (default 0.5: 500 ancestral steps):

* `purify`: one purification (500 network calls), run and timed;
* `exact`: one `exact` input gradient of sum(w * purify(x)), equinox's recursive checkpointing
  with equinox's own default number of checkpoints (floor(sqrt(2 n + 1/4) - 1/2) = 31 of 500
  states; the library's default until 2026-12), run and timed;
* `exact-ckpt-n`: the same with checkpoints = n (every state stored, each step's network
  recomputed once in the backward pass; the library's default now): compiled and analysed, run
  only with --run-all;
* `scan-store-all`: the chain as a plain `lax.scan` under `jax.grad`, no checkpointing (every
  step's network activations stored): compiled and analysed, never run.

For each: compile time and XLA's compiled memory analysis (temp = working memory beyond
arguments and outputs). The gradient schemes are also compiled (not run) at the step counts of
--memory-steps (default 20, 100), to show how memory grows with n: `scan-store-all` grows as
n x one network VJP's residuals (the estimate column), the checkpointed `exact` does not (at this
size a state is 49 kB per image, one step's VJP tens of MB: the working memory is one step's).

    python -m benchmarks.ddpm_cost
    python -m benchmarks.ddpm_cost --batch 1 --t-star 0.5 --memory-steps 20,100 --run-all

Results: benchmarks/results/ddpm_cost.json.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import noise  # noqa: E402
from diffpure_jax.convert.ddpm import abstract_variables, architecture  # noqa: E402
from diffpure_jax.ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule  # noqa: E402
from diffpure_jax.models.ddpm_unet import DDPMUNet  # noqa: E402

DEFAULT_OUT = common.RESULTS / "ddpm_cost.json"
# ../shared/reference/README.md, `ddpm_celebahq256_*`: the small config.
SMALL = {
    "image_size": 64,
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
}
SCHEMES = ("purify", "exact", "exact-ckpt-n", "scan-store-all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--t-star", type=float, default=0.5)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--memory-steps", default="20,100", help="also compile gradients at these n")
    p.add_argument("--run-all", action="store_true", help="also run exact-ckpt-n")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def small_purifier(t_star: float) -> DDPMPurifier:
    kwargs = architecture(**SMALL)
    module = DDPMUNet(**kwargs)
    variables = common.random_variables(abstract_variables(kwargs))
    size = kwargs["image_size"]
    shape = (size, size, kwargs["in_channels"])
    return DDPMPurifier(variables, module.apply, DDPMSchedule(), shape, DDPMConfig(t_star=t_star))


def scan_store_all(p: DDPMPurifier, x, key):
    """The chain as a bare lax.scan (the noise and steps of `p(x, key)`), nothing rematerialised."""
    keys = noise.example_keys(key, jnp.arange(x.shape[0]))
    shape = tuple(p.image_shape)
    x_t = p.schedule.diffuse(2.0 * x - 1.0, noise.forward_noise(keys, shape), p.n_steps)

    def step(y, i):
        z = noise.step_noise(keys, i, shape)
        return p.schedule.step(lambda v, t: p.eps_fn(p.variables, v, t), y, i, z), None

    y, _ = jax.lax.scan(step, x_t, jnp.arange(p.n_steps - 1, -1, -1))
    return (y + 1.0) / 2.0


def case_fn(scheme: str):
    if scheme == "purify":
        return lambda x, p, w, key: p(x, key)
    if scheme == "scan-store-all":
        return jax.grad(lambda x, p, w, key: jnp.sum(w * scan_store_all(p, x, key)))
    return jax.grad(lambda x, p, w, key: jnp.sum(w * p(x, key)))


def step_residual_bytes(p: DDPMPurifier, batch: int) -> int:
    """Bytes reverse mode saves of one network evaluation (VJP in x; parameters excluded)."""
    from jax._src.ad_checkpoint import saved_residuals

    x = jnp.zeros((batch, *p.image_shape))
    t = jnp.full((batch,), 250, jnp.int32)
    residuals = saved_residuals(lambda v, y: p.eps_fn(v, y, t), p.variables, x)
    return sum(
        int(aval.size * aval.dtype.itemsize)
        for aval, origin in residuals
        if not origin.startswith("from the argument v")
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    schemes = args.schemes.split(",")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("ddpm_cost", {**config, "model": SMALL})
    base = small_purifier(args.t_star)
    n = base.n_steps
    residual = step_residual_bytes(base, args.batch)
    print(f"{n} steps; one network VJP saves {residual / common.MB:.1f} MB of activations")
    x, w, key = common.inputs(args.batch, shape=tuple(base.image_shape))
    steps = sorted({int(k) for k in args.memory_steps.split(",") if k} | {n})
    results = []
    start = time.perf_counter()
    for k in steps:
        for scheme in schemes:
            if scheme == "purify" and k != n:
                continue
            p = base.replace(t_star=k / base.schedule.num_timesteps)
            if scheme in ("exact", "exact-ckpt-n"):  # "exact": the sqrt count, explicitly
                p = p.replace(
                    checkpoints=k if scheme == "exact-ckpt-n" else common.default_checkpoints(k)
                )
            fargs = jax.block_until_ready((x, p, w, key))
            compiled, r = common.compile_fn(case_fn(scheme), fargs)
            runs = scheme in ("purify", "exact") or (scheme == "exact-ckpt-n" and args.run_all)
            r.update(
                scheme=scheme,
                n_steps=k,
                stored_states={
                    "purify": 0,
                    "exact": common.default_checkpoints(k),
                    "exact-ckpt-n": k,
                    "scan-store-all": k,
                }[scheme],
                xla_memory=common.memory_analysis(compiled),
                ran=k == n and runs,
            )
            if r["ran"]:
                r.update(common.time_compiled(compiled, fargs, args.repeats, args.budget_s))
            del compiled
            results.append(r)
            temp = r["xla_memory"].get("temp_size_in_bytes")
            print(
                f"[{time.perf_counter() - start:6.0f} s] n={k} {scheme}: temp "
                f"{common.fmt_mb(temp)} MB, compile {r['compile_s']:.1f} s, "
                + (f"run {r['steady_s']:.2f} s" if r["ran"] else "not run"),
                flush=True,
            )
    rows = [
        [
            r["n_steps"],
            r["scheme"],
            r["stored_states"],
            common.fmt_mb(r["xla_memory"].get("temp_size_in_bytes")),
            common.fmt_mb(residual * r["n_steps"]) if r["scheme"] != "purify" else "-",
            f"{r['compile_s']:.1f}",
            "no" if r.get("steady_s") is None else f"{r['steady_s']:.2f}",
            "-" if r.get("steady_s") is None else common.fmt_load(r),
        ]
        for r in results
    ]
    table = common.markdown_table(
        [
            "steps",
            "scheme",
            "states stored",
            "XLA temp (MB)",
            "store-all estimate n x residuals (MB)",
            "compile (s)",
            "run (s)",
            "others CPU/wall",
        ],
        rows,
    )
    total = time.perf_counter() - start
    print()
    print(table)
    print(f"\ntotal {total:.0f} s")
    common.write_json(
        args.out,
        {
            "environment": env,
            "config": {**config, "model": SMALL},
            "command": common.command("benchmarks.ddpm_cost", argv),
            "one_step_residual_bytes": residual,
            "results": results,
            "table": table,
            "total_s": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
