"""What a GPU user needs to plan an ImageNet run: the compiled memory of the full-size ADM +
ResNet-50 path, and the CPU time of the small one.

* `full` (compile only, nothing runs): DiffPure's ImageNet defense at full size, the guided-
  diffusion 256 x 256 ADM (552.8M params) behind the torchvision ResNet-50 (25.6M), t* = 0.15,
  dt = 1e-3 (150 Euler steps), 224 -> 256 -> 224 bilinear resizes. For each batch in --batches
  (default 1, 4, 16): one purification, one `exact` input gradient of the cross-entropy through
  purifier and classifier (diffrax RecursiveCheckpointAdjoint, default checkpoints: 16 of 150
  states) and one `adjoint` gradient. Each is lowered with abstract weights
  (`jax.ShapeDtypeStruct`: no 2.3 GB of weights are allocated) and compiled for this machine's
  backend; XLA's memory analysis gives the argument (weights + inputs), output and temporary
  (working) bytes. On a GPU the same script gives the GPU compiler's figures.
* `small` (runs): the same path with the reference-sized models (ADM 64 x 64, 32 channels,
  1.0M params; ResNet with planes / 8, 0.3M params; 56 -> 64 -> 56 resizes), random weights, 150
  steps: seconds per example of one purification and of one exact gradient at --small-batch.

    python -m benchmarks.imagenet_cost
    python -m benchmarks.imagenet_cost --batches 1,4,16 --small-batch 4 --skip-small

Results: benchmarks/README.md, section 11.
"""

from __future__ import annotations

import os

os.environ["EQX_ON_ERROR"] = "nan"  # before equinox/diffrax are imported (see common.py)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from diffpure_jax import Classifier, DefendedClassifier, Purifier, PurifyConfig  # noqa: E402
from diffpure_jax.models.guided_unet import ADM_IMAGENET256, GuidedUNet  # noqa: E402
from diffpure_jax.models.resnet import ResNet  # noqa: E402
from diffpure_jax.score import ScoreModel, guided_diffusion_score_fn  # noqa: E402
from diffpure_jax.sde import VPSDE  # noqa: E402

DEFAULT_OUT = common.RESULTS / "imagenet_cost.json"
GIB = 2**30
# The reference small models (../shared/reference/README.md): guided_imagenet256_small and
# resnet50_imagenet_small.
SMALL_ADM = {
    **ADM_IMAGENET256,
    "image_size": 64,
    "model_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": [2, 4],
    "channel_mult": [1, 1, 2],
    "num_head_channels": 16,
}
SMALL_RESNET = {"layers": [2, 1, 1, 1], "planes": [8, 16, 32, 64], "num_classes": 10}
SIZES = {  # name -> (ADM kwargs, ResNet kwargs, classifier input side)
    "full": (ADM_IMAGENET256, {}, 224),
    "small": (SMALL_ADM, SMALL_RESNET, 56),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4,16", help="full-size batches to compile")
    p.add_argument("--small-batch", type=int, default=1)
    p.add_argument("--t-star", type=float, default=0.15)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-small", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=120.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def defended(size: str, config: PurifyConfig, abstract: bool, seed: int = 0):
    """DiffPure's ImageNet defense at `size` ('full' or 'small'): the ADM purifier resizing
    from the classifier's input side, and the ResNet. Weights abstract (shapes only) or
    random (common.random_variables)."""
    adm_kwargs, resnet_kwargs, side = SIZES[size]
    unet, resnet = GuidedUNet(**adm_kwargs), ResNet(**resnet_kwargs, image_size=side)
    s = adm_kwargs["image_size"]
    score_vars = jax.eval_shape(
        unet.init, jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32)
    )
    class_vars = jax.eval_shape(resnet.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
    if not abstract:
        score_vars = common.random_variables(score_vars, seed)
        class_vars = common.random_variables(class_vars, seed + 1)
    sde = VPSDE()
    score = ScoreModel(score_vars, guided_diffusion_score_fn(unet.apply, sde), sde, (s, s, 3))
    purifier = Purifier(score, dataclasses.replace(config, input_size=side))
    return DefendedClassifier(purifier, Classifier(class_vars, resnet.apply, (side, side, 3)))


def purify_case(model, x, y, key):
    del y
    return model.purifier(x, key)


def gradient_case(model, x, y, key):
    def loss(x):
        logits = model(x, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    return jax.grad(loss)(x)


CASES = {"purify": (purify_case, "exact"), "exact": (gradient_case, "exact")}
CASES["adjoint"] = (gradient_case, "adjoint")


def case_args(model, batch: int, side: int, abstract: bool):
    if abstract:
        x = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    else:
        x = jax.random.uniform(jax.random.key(1), (batch, side, side, 3), minval=0.05, maxval=0.95)
        y = jnp.zeros((batch,), jnp.int32)
    return model, x, y, jax.random.key(2)


def full_memory(args, config) -> list[dict]:
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for name, (fn, grad) in CASES.items():
            model = defended("full", dataclasses.replace(config, grad=grad), abstract=True)
            t = time.perf_counter()
            compiled = jax.jit(fn).lower(*case_args(model, batch, 224, True)).compile()
            row = {
                "case": name,
                "batch": batch,
                "compile_s": time.perf_counter() - t,
                "xla_memory": common.memory_analysis(compiled),
                "xla_cost": {
                    k: v for k, v in common.cost_analysis(compiled).items() if k == "flops"
                },
            }
            del compiled
            m = row["xla_memory"]
            total = sum(m.get(k, 0) for k in ("argument_size_in_bytes", "temp_size_in_bytes"))
            row["total_gib"] = total / GIB
            rows.append(row)
            args_gib = m.get("argument_size_in_bytes", 0) / GIB
            print(
                f"full {name:8s} batch {batch:3d}: args {args_gib:.2f}"
                f" GiB, temp {m.get('temp_size_in_bytes', 0) / GIB:.2f} GiB, total "
                f"{total / GIB:.2f} GiB (compiled in {row['compile_s']:.0f} s)",
                flush=True,
            )
    return rows


def small_time(args, config) -> list[dict]:
    rows = []
    for name, (fn, grad) in CASES.items():
        model = defended("small", dataclasses.replace(config, grad=grad), abstract=False)
        r = common.measure(fn, case_args(model, args.small_batch, 56, False), args.repeats,
                           args.budget_s)  # fmt: skip
        r.update(case=name, batch=args.small_batch)
        r["s_per_example"] = r["steady_s"] / args.small_batch
        rows.append(r)
        print(
            f"small {name:8s} batch {args.small_batch}: {r['steady_s']:.2f} s "
            f"({r['s_per_example']:.2f} s per example; others' load {common.fmt_load(r)})",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    config = PurifyConfig(t_star=args.t_star, dt=args.dt)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    env = common.header("imagenet_cost", {**settings, "n_steps": config.n_steps})
    payload = {"environment": env, "config": settings, "n_steps": config.n_steps,
               "command": common.command("benchmarks.imagenet_cost", argv)}  # fmt: skip
    if not args.skip_small:
        payload["small"] = small_time(args, config)
        common.write_json(args.out, payload)
    if not args.skip_full:
        payload["full"] = full_memory(args, config)
    common.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
