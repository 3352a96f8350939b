"""Score-model training: VP-SDE continuous denoising score matching, as score_sde trains NCSN++.

For x0 in [0, 1] mapped to [-1, 1], t in [eps, 1], z ~ N(0, I):
    x_t = sqrt(alpha_bar(t)) x0 + std(t) z,   loss = mean_pixels (eps_theta(x_t, 999 t) - z)^2,
which is score_sde's `reduce_mean=True` continuous VP loss (score = -eps_theta / std). Adam with a
linear warm-up, global-norm gradient clipping and an EMA of the weights, as score_sde; the EMA
weights are the ones exported.

Choice of t: DiffPure only ever evaluates the score at t <= t* (0.1 by default; sweeps go to 0.3),
but generation from pure noise needs all of [eps, 1]. So `small_t_fraction` of each batch draws t
uniformly from [eps, small_t_max] and the rest from [eps, 1]. The minimiser is the same score for
any such density (it only reweights t), while small-t denoising, which purification depends on,
gets 65% of the updates (t <= 0.3) instead of uniform sampling's 30%.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import models
from ..checkpoint import save_variables
from ..sde import VPSDE
from .loop import LoopConfig, run_training


@dataclasses.dataclass(frozen=True)
class ScoreTraining:
    """Optimiser and noise-level settings (defaults: score_sde's, scaled to short runs)."""

    lr: float = 5e-4
    warmup_steps: int = 300
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    small_t_fraction: float = 0.5
    small_t_max: float = 0.3
    t_eps: float = 1e-5


def sample_t(key: jax.Array, n: int, cfg: ScoreTraining) -> jax.Array:
    """(n,) diffusion times: a `small_t_fraction` mixture of U[eps, small_t_max] and U[eps, 1]."""
    k_u, k_mix = jax.random.split(key)
    u = jax.random.uniform(k_u, (n,))
    high = jnp.where(jax.random.bernoulli(k_mix, cfg.small_t_fraction, (n,)), cfg.small_t_max, 1.0)
    return cfg.t_eps + u * (high - cfg.t_eps)


def dsm_loss(apply_fn, params, x0: jax.Array, key: jax.Array, sde: VPSDE, cfg: ScoreTraining):
    """Scalar DSM loss of an eps-predicting network on x0 (B, H, W, C) in [0, 1]."""
    k_t, k_z, k_drop = jax.random.split(key, 3)
    t = sample_t(k_t, x0.shape[0], cfg)
    z = jax.random.normal(k_z, x0.shape)
    b = (-1,) + (1,) * (x0.ndim - 1)
    x_t = jnp.sqrt(sde.alpha_bar(t)).reshape(b) * (2.0 * x0 - 1.0) + sde.std(t).reshape(b) * z
    eps = apply_fn(
        {"params": params}, x_t, t * (sde.n_discrete - 1), train=True, rngs={"dropout": k_drop}
    )
    return jnp.mean((eps - z) ** 2)


def make_optimizer(cfg: ScoreTraining) -> optax.GradientTransformation:
    warmup = max(cfg.warmup_steps, 1)

    def schedule(count):  # score_sde's linear warm-up; step 1 already moves the weights
        return cfg.lr * jnp.minimum((count + 1.0) / warmup, 1.0)

    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(schedule))


def init_state(module, cfg: ScoreTraining, input_shape, seed: int) -> dict:
    """{"step", "params", "ema", "opt_state"} for a freshly initialised network."""
    x = jnp.zeros((1, *input_shape))
    params = module.init(jax.random.key(seed), x, jnp.zeros((1,)))["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": params,
        "opt_state": make_optimizer(cfg).init(params),
    }


def make_step(module, cfg: ScoreTraining, sde: VPSDE):
    """The jitted training step (state, (x0,), key) -> (state, {"loss"})."""
    optimizer = make_optimizer(cfg)

    @jax.jit
    def step(state, batch, key):
        (x0,) = batch
        loss, grads = jax.value_and_grad(lambda p: dsm_loss(module.apply, p, x0, key, sde, cfg))(
            state["params"]
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # EMA with score_sde's rate, warmed up so early checkpoints are usable in short runs.
        n = state["step"].astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        new = {"step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}
        return new, {"loss": loss}

    return step


def train_score(
    x_train: np.ndarray,
    out_dir: str,
    workdir: str,
    model_kwargs: dict,
    loop: LoopConfig,
    cfg: ScoreTraining = ScoreTraining(),
    sde: VPSDE | None = None,
    progress: bool = True,
    after_step=None,
    extra_config: dict | None = None,
) -> dict:
    """Train an NCSN++ on x_train (N, H, W, C) in [0, 1]; export its EMA weights to out_dir.

    Resumes from `workdir` when it holds the same run. Returns the exported config.json dict.
    """
    sde = sde or VPSDE()
    input_shape = list(x_train.shape[1:])
    module = models.build_model("ncsnpp", model_kwargs)
    # The learning rate is constant after warm-up, so n_steps is not part of the run's identity:
    # rerunning with a larger --steps extends a finished run.
    loop_identity = {k: v for k, v in dataclasses.asdict(loop).items() if k != "n_steps"}
    description = {
        "trainer": "score",
        "model_kwargs": model_kwargs,
        "loop": loop_identity,
        "training": dataclasses.asdict(cfg),
        "sde": dataclasses.asdict(sde),
        "n_train": len(x_train),
        "input_shape": input_shape,
    }
    state = init_state(module, cfg, input_shape, loop.seed)
    state = run_training(
        state,
        make_step(module, cfg, sde),
        (x_train,),
        loop,
        workdir,
        description,
        progress,
        after_step,
    )
    config = {
        "kind": "score",
        "architecture": "ncsnpp",
        "kwargs": model_kwargs,
        "input_shape": input_shape,
        "parameterization": "eps_continuous",
        "sde": dataclasses.asdict(sde),
        "training": {**description, "n_steps": int(state["step"]), **(extra_config or {})},
    }
    if out_dir:
        save_variables(out_dir, {"params": jax.device_get(state["ema"])}, config)
    return config
