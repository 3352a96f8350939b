"""DiffAttack's memory table (Kang, Song, Li, NeurIPS 2023, Table 5) against our DDPM gradients.

DiffAttack measures one gradient evaluation through a DDPM purifier (CIFAR-10, DDPM UNet, WRN-28-10
classifier, batch 16, RTX A6000) for T reverse DDPM steps: "naive backprop" 14.5 / 23.7 / 38.8
GB at T = 5 / 10 / 20 and out of memory at 30; their "segment-wise forward-backward" (store the
states, recompute one step's graph at a time in the backward pass) 2.8 / 2.7 / 2.8 / 2.9 / 3.9 GB
at T = 5 / 10 / 20 / 30 / 1000. Here the same gradient, one input gradient of
sum_b CE(classifier(purify(x))_b, y_b), is compiled (never run) and XLA's memory analysis read:

* purifier: `DDPMUNet` at Ho et al.'s CIFAR-10 size (32 x 32 x 3, ch 128, ch_mult 1,2,2,2, 2
  residual blocks per level, attention at 16; 35.7M params), DDPM schedule with 1000 timesteps,
  t* = T / 1000 (`diffpure_jax.ddpm.DDPMPurifier`);
* classifier: the WRN-28-10 of `checkpoints/cifar10-wrn-28-10` (RobustBench 'Standard', 36.5M
  params; `diffpure_jax.convert.classifiers`, variant robustbench-wrn);
* weights abstract (`jax.ShapeDtypeStruct`: no weights are allocated; they do not change memory);
* schemes: `exact` = the library's gradient as it was until 2026-12 (equinox's recursive
  checkpointing with equinox's default floor(sqrt(2 T + 1/4) - 1/2) stored states); `segment-wise`
  = the same with checkpoints = T (every state stored, each step's network recomputed once in the
  backward pass: DiffAttack's scheme, and the library's default now); `naive` = the chain as a
  plain `lax.scan` under `jax.grad` (`ddpm_cost.scan_store_all`: every step's network activations
  stored: their naive backprop), by default only up to T = 30.

XLA:CPU's analysis is not a GPU's: PyTorch's caching allocator, cuDNN workspaces and the CUDA
context are not in it, and XLA:GPU schedules buffers differently. The paper's numbers sit next
to ours for the shape of the curves, not to the tenth of a GB.

    python -m benchmarks.diffattack_memory
    python -m benchmarks.diffattack_memory --steps 5,10,20,30,1000 --naive-max-steps 30
    python -m benchmarks.diffattack_memory --tiny --steps 2,4 --out /tmp/x.json   # the test's

Results: benchmarks/results/diffattack_memory.json, benchmarks/README.md section 14.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.ddpm_cost import scan_store_all, step_residual_bytes  # noqa: E402
from diffpure_jax.classifier import Classifier  # noqa: E402
from diffpure_jax.convert.ddpm import abstract_variables, architecture  # noqa: E402
from diffpure_jax.ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule  # noqa: E402
from diffpure_jax.models.ddpm_unet import DDPMUNet  # noqa: E402
from diffpure_jax.models.wideresnet import WideResNet  # noqa: E402

DEFAULT_OUT = common.RESULTS / "diffattack_memory.json"
GB = 1e9
# Ho et al.'s CIFAR-10 DDPM (diffusion/configs: ch 128, ch_mult 1,2,2,2, 2 blocks, attn at 16).
UNET = {
    "image_size": 32,
    "ch": 128,
    "ch_mult": [1, 2, 2, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
}
# RobustBench 'Standard' WRN-28-10 (convert/classifiers.py, variant robustbench-wrn).
WRN = {"depth": 28, "widen_factor": 10, "num_classes": 10, "drop_rate": 0.0, "normalize": False}
# --tiny (the test): the smallest UNet the model allows (GroupNorm has 32 groups: ch >= 32) and a
# WRN-10-1.
TINY_UNET = {**UNET, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1}
TINY_WRN = {**WRN, "depth": 10, "widen_factor": 1}
SCHEMES = ("exact", "segment-wise", "naive")
# DiffAttack Table 5 (RTX A6000, batch 16): GB of one gradient evaluation, and seconds of the
# segment-wise one. None: out of memory. Our `exact` has no counterpart.
PAPER_GB = {
    "naive": {5: 14.5, 10: 23.7, 20: 38.8, 30: None},
    "segment-wise": {5: 2.8, 10: 2.7, 20: 2.8, 30: 2.9, 1000: 3.9},
}
PAPER_SEGMENT_WISE_S = {5: 0.44, 10: 0.85, 20: 1.82, 30: 2.67, 1000: 85.8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", default="5,10,20,30,1000", help="reverse DDPM steps T")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument(
        "--naive-max-steps", type=int, default=30, help="compile `naive` only up to this T"
    )
    p.add_argument("--tiny", action="store_true", help="tiny UNet and WRN-10-1 (the test)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def purifier(unet: dict, n_steps: int, checkpoints: int | None = None) -> DDPMPurifier:
    """The DDPM purifier at `unet`'s size with abstract weights, t* = n_steps / 1000."""
    kwargs = architecture(**unet)
    module = DDPMUNet(**kwargs)
    size = kwargs["image_size"]
    shape = (size, size, kwargs["in_channels"])
    schedule = DDPMSchedule(num_timesteps=1000)
    config = DDPMConfig(t_star=n_steps / schedule.num_timesteps, checkpoints=checkpoints)
    return DDPMPurifier(abstract_variables(kwargs), module.apply, schedule, shape, config)


def classifier(wrn: dict, shape: tuple[int, int, int]) -> Classifier:
    """The WideResNet with abstract variables (params and batch_stats)."""
    module = WideResNet(**wrn)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *shape)))
    return Classifier(variables, module.apply, shape)


def classifier_residual_bytes(clf: Classifier, batch: int) -> int:
    """Bytes reverse mode saves of one classifier evaluation (VJP in x; variables excluded)."""
    from jax._src.ad_checkpoint import saved_residuals

    x = jnp.zeros((batch, *clf.image_shape))
    residuals = saved_residuals(lambda v, y: clf.apply_fn(v, y), clf.variables, x)
    return sum(
        int(aval.size * aval.dtype.itemsize)
        for aval, origin in residuals
        if not origin.startswith("from the argument v")
    )


def loss_grad(scheme: str):
    """jit-able (x, purifier, classifier, y, key) -> d sum_b CE(classifier(purify(x)), y) / dx."""
    chain = scan_store_all if scheme == "naive" else (lambda p, x, key: p(x, key))

    def loss(x, p, clf, y, key):
        logits = clf(chain(p, x, key), check=False)  # purified images may leave [0, 1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    return jax.grad(loss)


def stored_states(scheme: str, n: int) -> int:
    return common.default_checkpoints(n) if scheme == "exact" else n


def total_bytes(m: dict) -> int:
    """arguments + outputs + temp - aliased (XLA's peak bound of the program's buffers)."""
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return sum(m.get(k, 0) for k in keys) - m.get("alias_size_in_bytes", 0)


def fmt_gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:.2f}"


def paper_cell(scheme: str, n: int) -> str:
    table = PAPER_GB.get(scheme, {})
    if n not in table:
        return "-"
    return "OOM (48 GB)" if table[n] is None else f"{table[n]:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        raise SystemExit(f"unknown scheme(s) {sorted(unknown)}; known: {', '.join(SCHEMES)}")
    steps = sorted({int(k) for k in args.steps.split(",") if k})
    unet, wrn = (TINY_UNET, TINY_WRN) if args.tiny else (UNET, WRN)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    models = {"unet": unet, "classifier": {"architecture": "wideresnet", **wrn}}
    env = common.header("diffattack_memory", {**config, "models": models})

    base = purifier(unet, steps[0])
    clf = classifier(wrn, tuple(base.image_shape))
    shape = (args.batch, *base.image_shape)
    state = 4 * math.prod(shape)  # float32
    unet_residual = step_residual_bytes(base, args.batch)
    clf_residual = classifier_residual_bytes(clf, args.batch)
    params = {
        "unet": common.n_params(base.variables["params"]),
        "classifier": common.n_params(clf.variables["params"]),
    }
    print(
        f"UNet {params['unet'] / 1e6:.1f}M params, classifier {params['classifier'] / 1e6:.1f}M"
        f" params; a state (batch {args.batch}) is {state / 1e3:.0f} kB; one UNet "
        f"step's VJP saves {unet_residual / GB:.3f} GB, the classifier's {clf_residual / GB:.3f}"
        " GB",
        flush=True,
    )
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    key = jax.random.key(0)

    results, skipped = [], []
    start = time.perf_counter()
    for n in steps:
        for scheme in schemes:
            if scheme == "naive" and n > args.naive_max_steps:
                skipped.append({"n_steps": n, "scheme": scheme, "why": "--naive-max-steps"})
                continue
            p = purifier(unet, n, stored_states(scheme, n))
            compiled, r = common.compile_fn(loss_grad(scheme), (x, p, clf, y, key))
            memory = common.memory_analysis(compiled)
            del compiled
            r.update(
                scheme=scheme,
                n_steps=n,
                stored_states=stored_states(scheme, n),
                xla_memory=memory,
                total_bytes=total_bytes(memory),
                paper_gb=PAPER_GB.get(scheme, {}).get(n),
                paper_oom=n in PAPER_GB.get(scheme, {}) and PAPER_GB[scheme][n] is None,
            )
            if scheme == "segment-wise" and n in PAPER_SEGMENT_WISE_S:
                r["paper_s"] = PAPER_SEGMENT_WISE_S[n]
            results.append(r)
            print(
                f"[{time.perf_counter() - start:6.0f} s] T={n} {scheme}: temp "
                f"{fmt_gb(memory.get('temp_size_in_bytes'))} GB, total "
                f"{fmt_gb(r['total_bytes'])} GB, compile {r['compile_s']:.1f} s",
                flush=True,
            )

    rows = [
        [
            r["n_steps"],
            r["scheme"],
            r["stored_states"],
            fmt_gb(r["xla_memory"].get("argument_size_in_bytes")),
            fmt_gb(r["xla_memory"].get("output_size_in_bytes")),
            fmt_gb(r["xla_memory"].get("temp_size_in_bytes")),
            fmt_gb(r["total_bytes"]),
            paper_cell(r["scheme"], r["n_steps"]),
            f"{r['compile_s']:.1f}",
        ]
        for r in results
    ]
    table = common.markdown_table(
        [
            "T",
            "scheme",
            "states stored",
            "arguments (GB)",
            "outputs (GB)",
            "temp (GB)",
            "total (GB)",
            "DiffAttack (GB)",
            "compile (s)",
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
            "config": {**config, "models": models},
            "command": common.command("benchmarks.diffattack_memory", argv),
            "n_params": params,
            "state_bytes": state,
            "unet_step_residual_bytes": unet_residual,
            "classifier_residual_bytes": clf_residual,
            "paper": {
                "source": "Kang, Song, Li, DiffAttack (NeurIPS 2023), Table 5: RTX A6000, batch 16",
                "gb": {s: {str(k): v for k, v in t.items()} for s, t in PAPER_GB.items()},
                "segment_wise_s": {str(k): v for k, v in PAPER_SEGMENT_WISE_S.items()},
            },
            "results": results,
            "skipped": skipped,
            "table": table,
            "total_s": total,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
