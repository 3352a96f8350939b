"""Classifier training: standard (cross-entropy) or PGD adversarial training (Madry et al. 2018).

SGD with Nesterov momentum, weight decay and a cosine learning rate with a linear warm-up; random
crops (zero padding) and horizontal flips. With `adversarial_eps > 0`, every batch is replaced by
PGD adversarial examples of the current model (random start in the Linf/L2 ball, `pgd_steps`
sign/normalised steps of `pgd_step_size`, the last iterate), as Madry et al. train: the
baseline DiffPure compares against. With `noise_std > 0`, a random half of every batch gets
Gaussian noise: a classifier less reliant on the fine texture that purification resamples.
`init_variables` starts from a trained classifier (fine-tuning) instead of a random
initialisation. With `diffuse_t_star > 0`, every image is replaced by its forward diffusion to t*
(`purify.diffuse_images`: what the reverse solve starts from, in [0, 1] units): a classifier of
the diffused image, which measures how much of the label survives to t*
(`python -m experiments.reports.diffused`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import models
from ..attacks.base import Threat, project
from ..attacks.losses import cross_entropy
from ..checkpoint import save_variables
from ..purify import diffuse_images
from .loop import LoopConfig, run_training


def _help(default, text: str, **metadata):
    """A field whose metadata carries its command-line help (experiments/config.py reads it)."""
    return dataclasses.field(default=default, metadata={"help": text, **metadata})


@dataclasses.dataclass(frozen=True)
class ClassifierTraining:
    """SGD-Nesterov with a cosine schedule, crops and flips; optional PGD (Madry et al.)."""

    lr: float = _help(0.1, "peak learning rate")
    momentum: float = _help(0.9, "Nesterov momentum")
    weight_decay: float = _help(5e-4, "L2 weight decay")
    warmup_steps: int = _help(200, "linear warm-up steps")
    crop_padding: int = _help(2, "zero padding of the random crops, pixels")
    flip: bool = _help(True, "random horizontal flips")
    adversarial_eps: float = _help(0.0, "PGD training eps (0: off)")
    norm: str = _help("Linf", "PGD training threat", choices=("Linf", "L2"))
    pgd_steps: int = _help(7, "PGD steps per training batch")
    pgd_step_size: float | None = _help(None, "PGD step (none: 2.5 eps / pgd_steps, Madry et al.)")
    noise_std: float = _help(
        0.0,
        "Gaussian noise on a random half of each batch, std in [0, 1] pixel units (0: off; 0.16 "
        "is the noise level of t* = 0.1)",
    )
    diffuse_t_star: float = _help(
        0.0, "train on images forward-diffused to this t* (0: off); a diagnostic classifier"
    )


def augment(x: jax.Array, key: jax.Array, padding: int, flip: bool) -> jax.Array:
    """Random crops of zero-padded images and random horizontal flips; x (B, H, W, C)."""
    b, h, w, _ = x.shape
    k_crop, k_flip = jax.random.split(key)
    if padding:
        padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)
        x = jax.vmap(
            lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        )(padded, offsets)
    if flip:
        x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
    return x


def add_noise(x: jax.Array, key: jax.Array, std: float) -> jax.Array:
    """x + N(0, std^2) on a random half of the batch (each example with probability 1/2), the
    others unchanged; not clipped. x (B, H, W, C)."""
    k_pick, k_noise = jax.random.split(key)
    noisy = jax.random.bernoulli(k_pick, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(noisy, x + std * jax.random.normal(k_noise, x.shape, x.dtype), x)


def pgd_examples(loss_fn, x, y, key, threat: Threat, n_steps: int, step_size: float):
    """Madry PGD: random start, n_steps ascent steps on loss_fn(x, y) (mean), last iterate."""
    if threat.norm == "Linf":
        delta = jax.random.uniform(key, x.shape, minval=-threat.eps, maxval=threat.eps)
    else:
        delta = jax.random.normal(key, x.shape)
        flat = jnp.sqrt(jnp.sum(delta**2, axis=(1, 2, 3), keepdims=True))
        delta = delta / flat * threat.eps * jax.random.uniform(key, (x.shape[0], 1, 1, 1))
    x_adv = project(x + delta, x, threat)

    # Unrolled into straight-line code (pgd_steps is small). The network's convolutions use
    # models/conv.py, whose input gradient is as fast inside a lax loop as outside one
    # (benchmarks/README.md, "Convolution gradients inside loops"), so a loop would serve too.
    for _ in range(n_steps):
        g = jax.grad(lambda xa: loss_fn(xa, y))(x_adv)
        if threat.norm == "Linf":
            d = jnp.sign(g)
        else:
            d = g / jnp.maximum(jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3), keepdims=True)), 1e-12)
        x_adv = project(x_adv + step_size * d, x, threat)
    return jax.lax.stop_gradient(x_adv)


def make_optimizer(cfg: ClassifierTraining, n_steps: int) -> optax.GradientTransformation:
    # At most a tenth of the run warms up; the first step already moves the weights.
    warmup = max(1, min(cfg.warmup_steps, n_steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        cfg.lr / warmup, cfg.lr, warmup, max(n_steps, warmup + 1)
    )
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum, nesterov=True),
    )


def init_state(
    module, cfg: ClassifierTraining, input_shape, seed: int, n_steps: int, init_variables=None
) -> dict:
    """The training state; from `init_variables` ({"params", "batch_stats"}) when given."""
    variables = init_variables or module.init(jax.random.key(seed), jnp.zeros((1, *input_shape)))
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": make_optimizer(cfg, n_steps).init(params),
    }


def make_step(module, cfg: ClassifierTraining, n_steps: int):
    """The jitted step (state, batch, key) -> (state, {"loss", "accuracy"}); batch is (x, y)."""
    optimizer = make_optimizer(cfg, n_steps)
    threat = Threat(cfg.norm, cfg.adversarial_eps) if cfg.adversarial_eps > 0 else None
    step_size = cfg.pgd_step_size or 2.5 * cfg.adversarial_eps / max(cfg.pgd_steps, 1)

    def forward(params, batch_stats, x, key):
        return module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )

    @jax.jit
    def step(state, batch, key):
        x, y = batch
        k_aug, k_pgd, k_drop = jax.random.split(key, 3)
        x = augment(x, k_aug, cfg.crop_padding, cfg.flip)
        if cfg.noise_std > 0:
            x = add_noise(x, jax.random.fold_in(key, 3), cfg.noise_std)
        if cfg.diffuse_t_star > 0:
            eps = jax.random.normal(jax.random.fold_in(key, 5), x.shape, x.dtype)
            x = diffuse_images(x, eps, cfg.diffuse_t_star)
        if threat is not None:
            # The attack sees the model in training mode; its batch-statistics updates are dropped.
            def attack_loss(xa, ya):
                logits, _ = forward(state["params"], state["batch_stats"], xa, k_drop)
                return jnp.mean(cross_entropy(logits, ya))

            x = pgd_examples(attack_loss, x, y, k_pgd, threat, cfg.pgd_steps, step_size)

        def loss_fn(params):
            logits, updates = forward(params, state["batch_stats"], x, k_drop)
            return jnp.mean(cross_entropy(logits, y)), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return new, {"loss": loss, "accuracy": accuracy}

    return step


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    out_dir: str,
    workdir: str,
    architecture: str,
    model_kwargs: dict,
    loop: LoopConfig,
    cfg: ClassifierTraining = ClassifierTraining(),
    progress: bool = True,
    after_step=None,
    extra_config: dict | None = None,
    init_variables: dict | None = None,
    provenance: dict | None = None,
) -> tuple[dict, dict]:
    """Train `architecture(**model_kwargs)` on x_train (N, H, W, C) in [0, 1], y_train (N,).

    `init_variables` ({"params", "batch_stats"} of the same architecture) fine-tunes a trained
    classifier. `provenance` (where the initial variables come from) joins the run's
    description: a rerun from another source refuses to resume.
    Resumes from `workdir` when it holds the same run; exports to `out_dir` (if given).
    Returns (the exported config.json dict, the final variables).
    """
    input_shape = list(x_train.shape[1:])
    module = models.build_model(architecture, model_kwargs)
    description = {
        "trainer": "classifier",
        "architecture": architecture,
        "model_kwargs": model_kwargs,
        "loop": dataclasses.asdict(loop),
        "training": dataclasses.asdict(cfg),
        "n_train": len(x_train),
        "input_shape": input_shape,
        **({"provenance": provenance} if provenance else {}),
    }
    state = init_state(module, cfg, input_shape, loop.seed, loop.n_steps, init_variables)
    state = run_training(
        state,
        make_step(module, cfg, loop.n_steps),
        (x_train, y_train),
        loop,
        workdir,
        description,
        progress,
        after_step,
    )
    variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    config = {
        "kind": "classifier",
        "architecture": architecture,
        "kwargs": model_kwargs,
        "input_shape": input_shape,
        "training": {**description, **(extra_config or {})},
    }
    if out_dir:
        save_variables(out_dir, variables, config)
    return config, variables
