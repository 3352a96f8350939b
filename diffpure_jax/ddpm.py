"""DiffPure's CelebA-HQ purification: DDPM ancestral sampling from step t* (500), differentiable.

DiffPure's `runners/diffpure_ddpm.py` (`Diffusion.image_editing_sample`, SDEdit's DDPM):

    x in [0, 1] -> 2x - 1 -> x_n = sqrt(abar[n-1]) x + sqrt(1 - abar[n-1]) eps,  n = t* T
                -> for i = n-1, ..., 0:  x <- 1/sqrt(alpha_i) (x - beta_i / sqrt(1 - abar_i)
                                                 eps_theta(x, i)) + [i > 0] sigma_i z_i
                -> (x_0 + 1) / 2   (not clipped, as in the official code)

with linear betas over T = 1000 steps and the 'fixedsmall' variance sigma_i^2 = the DDPM
posterior variance (`DDPMSchedule`). 500 network calls at DiffPure's t* = 0.5.

The official code runs under `torch.no_grad()` (only BPDA attacks are possible). Here the chain
has the project's gradient modes (`DDPMConfig.grad`):

* `exact` (default): the exact gradient of the sampled chain, the same noise replayed. The steps
  run in `equinox.internal.scan(kind="checkpointed")` (the recursive checkpointing diffrax's
  RecursiveCheckpointAdjoint uses): `checkpoints` states are kept (default: all n, so no step
  is recomputed; fewer are recomputed from the nearest kept one); one step's network activations
  are live at a time, never the whole chain's. Memory: benchmarks/ddpm_cost.py.
* `bpda`: identity in the backward pass; `blind`: no gradient (as `purify.py`).
* `adjoint` is refused: it is the continuous adjoint of the VP-SDE, which this discrete chain
  does not have.

Noise: the forward eps is `noise.forward_noise(keys)` and step i's z_i is
`noise.step_noise(keys, i)`, a pure function of (key, example index, draw, i), so recomputation
replays it and an example's result does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from . import noise
from .attacks.base import eot_keys
from .purify import (
    AbstractPurifier,
    PurifyConfig,
    Trajectory,
    check_checkpoints,
    check_images,
    check_steps,
)
from .resize import resize_bilinear
from .score import SCORE_DTYPES, with_score_dtype

DDPM_GRAD_MODES = ("exact", "bpda", "blind")
VAR_TYPES = ("fixedsmall", "fixedlarge")
_ADJOINT_REFUSED = (
    "grad='adjoint' is the continuous adjoint of the VP-SDE; the DDPM chain is discrete: use "
    "exact (its exact, checkpointed gradient), bpda or blind"
)

# (variables, x (B, H, W, C) in [-1, 1], t (B,) int32 DDPM steps) -> eps (B, H, W, C)
EpsFn = Callable[[Any, Any, Any], Any]
# step index i (int scalar, possibly traced) -> z_i (B, H, W, C) standard normal
NoiseFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """The discrete DDPM schedule as the official code computes it (hashable: static).

    Attributes: beta_start, beta_end, num_timesteps (T) of the linear beta schedule, and
    var_type, 'fixedsmall' (DiffPure CelebA-HQ: the posterior variance) or 'fixedlarge' (beta).
    The arrays (numpy, (T,)) follow `runners/diffpure_ddpm.py`: `betas64` np.linspace in
    float64; `betas` its float32 cast; `alphas_cumprod` the float32 cumprod of 1 - betas (float32)
    as torch computes it on CPU (accumulated in float64, rounded once; torch on CUDA accumulates in
    float32, which differs by up to 3e-7); `logvar` float64 from the float64 betas.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    var_type: str = "fixedsmall"

    def __post_init__(self):
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"DDPM betas must satisfy 0 < beta_start <= beta_end < 1, got "
                f"{self.beta_start}, {self.beta_end}."
            )
        if int(self.num_timesteps) != self.num_timesteps or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {self.num_timesteps}.")
        if self.var_type not in VAR_TYPES:
            raise ValueError(f"var_type must be one of {VAR_TYPES}, got {self.var_type!r}.")

    @classmethod
    def from_config(cls, ddpm: Mapping[str, Any]) -> DDPMSchedule:
        """From a checkpoint config.json's "ddpm" dict (keys are the fields; missing ones take
        SDEdit's CelebA-HQ values)."""
        unknown = set(ddpm) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown DDPM schedule field(s) {sorted(unknown)}; known: beta_start, "
                "beta_end, num_timesteps, var_type."
            )
        return cls(**ddpm)

    @property
    def betas64(self) -> np.ndarray:
        return np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)

    @property
    def betas(self) -> np.ndarray:
        return self.betas64.astype(np.float32)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        alphas = np.float32(1.0) - self.betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    @property
    def logvar(self) -> np.ndarray:
        """(T,) float64 log-variance of the reverse steps."""
        betas = self.betas64
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        if self.var_type == "fixedlarge":
            return np.log(np.append(posterior_variance[1], betas[1:]))
        return np.log(np.maximum(posterior_variance, 1e-20))

    def coefficients(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T,) float32 (1 / sqrt(alpha), beta / sqrt(1 - abar), exp(logvar / 2)) of a step,
        each computed in float32 from the float32 arrays, as the official step does."""
        betas, abar = self.betas, self.alphas_cumprod
        one = np.float32(1.0)
        c_mean = one / np.sqrt(one - betas)
        c_eps = betas / np.sqrt(one - abar)
        sigma = np.exp(np.float32(0.5) * self.logvar.astype(np.float32))
        return c_mean, c_eps, sigma

    def diffuse(self, x0: jax.Array, eps: jax.Array, t_star_steps: int) -> jax.Array:
        """x_t* = sqrt(abar[n-1]) x0 + sqrt(1 - abar[n-1]) eps for n = t_star_steps (the
        official forward, index n - 1). x0, eps (B, H, W, C), x0 in [-1, 1]; x0's dtype."""
        if not 1 <= t_star_steps <= self.num_timesteps:
            raise ValueError(f"t_star_steps must be in [1, {self.num_timesteps}].")
        abar = self.alphas_cumprod[t_star_steps - 1]
        a = np.sqrt(abar).astype(x0.dtype)
        s = np.sqrt(np.float32(1.0) - abar).astype(x0.dtype)
        return x0 * a + eps.astype(x0.dtype) * s

    def step(self, eps_fn, x: jax.Array, i, z: jax.Array) -> jax.Array:
        """One ancestral step x_i -> x_{i-1} (`image_editing_denoising_step_flexible_mask`).

        eps_fn(x, t): the network, t (B,) int32. x (B, H, W, C) in the model's scale; i the DDPM
        step, an int () or (B,) (possibly traced); z (B, H, W, C) standard normal, unused where
        i = 0. Returns mean + [i > 0] exp(logvar_i / 2) z, x's dtype."""
        t = jnp.broadcast_to(jnp.asarray(i, jnp.int32), x.shape[:1])
        c_mean, c_eps, sigma = (
            jnp.asarray(c, x.dtype)[t].reshape(-1, *(1,) * (x.ndim - 1))
            for c in self.coefficients()
        )
        mask = (t > 0).astype(x.dtype).reshape(c_mean.shape)
        mean = c_mean * (x - c_eps * eps_fn(x, t).astype(x.dtype))
        return mean + mask * sigma * z.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    """How to purify with a DDPM (DiffPure's CelebA-HQ defaults).

    Attributes:
      t_star: in (0, 1]; the chain starts at step n = t_star * num_timesteps (an integer; 500).
      grad: gradient mode, one of DDPM_GRAD_MODES ('adjoint' is refused: no continuous adjoint).
      checkpoints: states the `exact` gradient keeps (equinox's recursive checkpointing). None
        (default): every state, so each step's network runs once more in the backward pass and
        no forward step is recomputed (faster and, at CIFAR-10 and CelebA-HQ sizes, less memory
        than equinox's own sqrt(2 n) default: benchmarks/README.md, "Choosing the
        checkpoints"). An integer k < n keeps k states; values above n act as n.
      input_size: side of the square images taken and returned when it differs from the
        network's; resized bilinearly (`resize.resize_bilinear`) to the network's size before
        diffusion and back after the chain. None (CelebA-HQ): no resizing.
      score_dtype: 'float32' or 'bfloat16', the dtype the eps network computes in (as
        `PurifyConfig.score_dtype`; the chain state, coefficients and noise stay float32).
    """

    t_star: float = 0.5
    grad: str = "exact"
    checkpoints: int | None = None
    input_size: int | None = None
    score_dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 < self.t_star <= 1.0:
            raise ValueError(f"t_star must be in (0, 1], got {self.t_star}.")
        if self.grad == "adjoint":
            raise ValueError(_ADJOINT_REFUSED + ".")
        if self.grad not in DDPM_GRAD_MODES:
            raise ValueError(f"grad must be one of {DDPM_GRAD_MODES}, got {self.grad!r}.")
        check_checkpoints(self.checkpoints)
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(
                f"input_size must be a positive side in pixels, got {self.input_size}."
            )
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(
                f"score_dtype must be one of {SCORE_DTYPES}, got {self.score_dtype!r}."
            )

    def n_steps(self, num_timesteps: int = 1000) -> int:
        """round(t_star * num_timesteps), the number of network calls; ValueError unless
        t_star * num_timesteps is an integer."""
        n = self.t_star * num_timesteps
        if abs(n - round(n)) > 1e-6 * max(1.0, n):
            raise ValueError(
                f"t_star={self.t_star} is not a whole number of DDPM steps (t_star * "
                f"{num_timesteps} = {n:.6g}); use a multiple of 1/{num_timesteps}."
            )
        return int(round(n))

    @classmethod
    def from_purify_config(cls, config: PurifyConfig, num_timesteps: int = 1000) -> DDPMConfig:
        """The DDPMConfig of a (command-line) PurifyConfig: its t_star, grad, checkpoints,
        input_size and score_dtype.

        DiffPure's DDPM steps are fixed at 1 / num_timesteps: `dt` must be that (the
        PurifyConfig default 1e-3 for T = 1000) and is otherwise unused. The SDE-solver fields
        (t_end, solver, forward_schedule, probability_flow, brownian, unroll) have no meaning
        here: their defaults are accepted and ignored, other values refused (ValueError).
        """
        if abs(config.dt * num_timesteps - 1.0) > 1e-6:
            raise ValueError(
                f"dt={config.dt}: DDPM purification takes the fixed steps of its schedule, "
                f"dt = 1/{num_timesteps}; leave dt at {1 / num_timesteps:g}."
            )
        default = PurifyConfig()
        ignored = ("t_end", "solver", "forward_schedule", "probability_flow", "brownian", "unroll")
        changed = [f for f in ignored if getattr(config, f) != getattr(default, f)]
        if changed:
            raise ValueError(
                f"PurifyConfig field(s) {', '.join(changed)} do not apply to DDPM purification "
                "(ancestral steps, not an SDE solve); leave them at their defaults."
            )
        if config.grad == "adjoint":
            raise ValueError(_ADJOINT_REFUSED + ".")
        return cls(
            t_star=config.t_star,
            grad=config.grad,
            checkpoints=config.checkpoints,
            input_size=config.input_size,
            score_dtype=config.score_dtype,
        )


def stored_step_noise(z: jax.Array) -> NoiseFn:
    """The NoiseFn of stored noise in the official order: z (n, B, H, W, C), row j applied by
    step i = n - 1 - j (the order the official loop draws it)."""
    n = z.shape[0]
    return lambda i: z[n - 1 - i]


def keyed_step_noise(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> NoiseFn:
    """z_i = `noise.step_noise(keys, i, shape)`: keys (B,) -> (B, *shape), drawn on demand."""
    return lambda i: noise.step_noise(keys, i, tuple(shape), dtype)


def ddpm_chain(
    eps_fn,
    schedule: DDPMSchedule,
    x_t: jax.Array,
    n_steps: int,
    noise_fn: NoiseFn,
    checkpoints: int | None = None,
    steps: tuple[int, ...] = (),
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ancestral steps i = n_steps - 1, ..., 0 from x_t (B, H, W, C) (model scale) -> x_0.

    eps_fn(x, t) the network; noise_fn(i) gives z_i (called inside the loop, so noise is drawn
    per step and replayed when the checkpointed backward pass recomputes a step). Reverse-mode
    differentiable; `checkpoints` states are kept (None: all n_steps), one step's network
    activations at a time.

    steps: strictly increasing counts k in [0, n_steps] of steps taken; when given, returns
    (x_0, states (S, B, H, W, C)), the state after k steps (k = 0: x_t), kept in a buffer of the
    loop (written in place, not copied into every checkpoint; differentiable like x_0)."""
    slot = np.full(n_steps + 1, -1, np.int32)
    slot[list(steps)] = np.arange(len(steps))
    slot = jnp.asarray(slot)

    def keep(buf, x, k):
        s = slot[k]
        return eqxi.buffer_at_set(buf, jnp.maximum(s, 0), x, pred=s >= 0)

    def body(carry, i):
        x, buf = carry
        x = schedule.step(eps_fn, x, i, noise_fn(i))
        return (x, keep(buf, x, n_steps - i) if steps else buf), None

    buf = jnp.zeros((len(steps), *x_t.shape), x_t.dtype)
    if steps:
        buf = keep(buf, x_t, 0)
    ks = jnp.arange(n_steps - 1, -1, -1, dtype=jnp.int32)
    checkpoints = n_steps if checkpoints is None else min(int(checkpoints), n_steps)
    (x_0, buf), _ = eqxi.scan(
        body,
        (x_t, buf),
        ks,
        kind="checkpointed",
        checkpoints=checkpoints,
        buffers=(lambda carry: carry[1]) if steps else None,
    )
    return (x_0, buf) if steps else x_0


def _index(x, index):
    return jnp.arange(x.shape[0]) if index is None else jnp.asarray(index)


class DDPMPurifier(AbstractPurifier):
    """`purifier(x, key, index=None)`: a DDPM eps network bound to a DDPMConfig (a pytree).

    The same interface as `purify.Purifier` (`__call__`, `eot`, `replace`, `.config.grad`), so
    `defense.DefendedClassifier` takes either. x (B, H, W, C) in [0, 1] (H = W = input_size when
    set, else the network's size) -> purified (B, H, W, C), about [0, 1], not clipped.

    Attributes: `variables` (Flax variables), `eps_fn` (static `EpsFn`, e.g. DDPMUNet.apply),
    `schedule` (static DDPMSchedule), `image_shape` (H, W, C) of the network, `config`.
    """

    variables: Any
    eps_fn: EpsFn = eqx.field(static=True)
    schedule: DDPMSchedule = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    config: DDPMConfig = eqx.field(static=True, default=DDPMConfig())

    def __check_init__(self):
        if not isinstance(self.config, DDPMConfig):
            raise TypeError(
                f"DDPMPurifier takes a DDPMConfig, got {type(self.config).__name__} (convert a "
                "PurifyConfig with DDPMConfig.from_purify_config)."
            )
        self.config.n_steps(self.schedule.num_timesteps)

    @property
    def n_steps(self) -> int:
        return self.config.n_steps(self.schedule.num_timesteps)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images this purifier takes and returns."""
        side = self.config.input_size
        return tuple(self.image_shape) if side is None else (side, side, self.image_shape[-1])

    def purify_with_noise(self, x: jax.Array, eps: jax.Array, noise_fn: NoiseFn) -> jax.Array:
        """Purify x (B, H, W, C) in [0, 1] with given noise: eps (B, *image_shape) the forward
        noise (network size), noise_fn(i) -> z_i (B, *image_shape) (`stored_step_noise`,
        `keyed_step_noise`). Returns (B, H, W, C); gradients as `config.grad` says."""
        return self.trajectory_with_noise(x, eps, noise_fn).purified

    def trajectory_with_noise(
        self, x: jax.Array, eps: jax.Array, noise_fn: NoiseFn, steps=()
    ) -> Trajectory:
        """`purify_with_noise` with the chain's states after k steps for k in `steps`
        (strictly increasing in [0, n_steps]): a `purify.Trajectory`. Its times are (n - k) /
        num_timesteps; its diffused states use alphas_cumprod[n - 1 - k] (1 at k = n)."""
        x = check_images(x, self.input_shape)
        n = self.n_steps
        steps = check_steps(steps, n)
        mode = self.config.grad
        x_in = x if mode == "exact" else jax.lax.stop_gradient(x)  # no tangents into the chain
        x_in = resize_bilinear(x_in, self.image_shape[:2])
        x_t = self.schedule.diffuse(2.0 * x_in - 1.0, eps, n)
        apply = with_score_dtype(self.eps_fn, self.config.score_dtype)

        def eps_fn(y, t):
            return apply(self.variables, y, t)

        chain = ddpm_chain(eps_fn, self.schedule, x_t, n, noise_fn, self.config.checkpoints, steps)
        x_0, states = chain if steps else (chain, jnp.zeros((0, *x_t.shape), x_t.dtype))
        out = resize_bilinear((x_0 + 1.0) / 2.0, x.shape[1:3])
        abar = np.append(self.schedule.alphas_cumprod, np.float32(1.0))  # index -1: clean
        levels = np.array([abar[n - 1 - k] if k < n else 1.0 for k in steps], np.float32)
        signal = jnp.asarray(np.sqrt(levels), x.dtype)[:, None, None, None, None]
        x_diff = 2.0 * resize_bilinear(x, self.image_shape[:2]) - 1.0
        diffused = signal * x_diff + jnp.sqrt(1.0 - signal**2) * eps.astype(x.dtype)
        if mode == "bpda":
            out = x + jax.lax.stop_gradient(out - x)
        elif mode == "blind":  # out and states already depend on x through stop_gradient
            diffused = jax.lax.stop_gradient(diffused)
        times = jnp.asarray([(n - k) / self.schedule.num_timesteps for k in steps], jnp.float32)
        steps_ = jnp.asarray(steps, jnp.int32)
        return Trajectory(out, steps_, times, states, diffused, jnp.asarray(levels))

    def purify_with_keys(self, x: jax.Array, keys: jax.Array) -> jax.Array:
        """Purify x (N, H, W, C) in [0, 1] with one noise key per row, keys (N,)."""
        shape = tuple(self.image_shape)
        eps = noise.forward_noise(keys, shape, x.dtype)
        return self.purify_with_noise(x, eps, keyed_step_noise(keys, shape, x.dtype))

    def __call__(self, x, key, index=None):
        """One purification of x (B, H, W, C) in [0, 1]; noise from (key, index, step), index
        (B,) dataset indices (default arange(B))."""
        return self.purify_with_keys(x, noise.example_keys(key, _index(x, index)))

    def trajectory(self, x, key, steps, index=None):
        """`self(x, key, index)` with the chain's states after k steps, k in `steps`."""
        keys = noise.example_keys(key, _index(x, index))
        shape = tuple(self.image_shape)
        eps = noise.forward_noise(keys, shape, x.dtype)
        return self.trajectory_with_noise(x, eps, keyed_step_noise(keys, shape, x.dtype), steps)

    def eot(self, x, key, n_draws: int, index=None):
        """(n_draws, B, H, W, C) purifications in one batched chain; draw d equals
        `self(x, eot_keys(key, n_draws)[d], index)`."""
        idx = _index(x, index)
        keys = jax.vmap(lambda k: noise.example_keys(k, idx))(eot_keys(key, n_draws))
        flat = jnp.broadcast_to(x[None], (n_draws, *x.shape)).reshape(-1, *x.shape[1:])
        return self.purify_with_keys(flat, keys.reshape(-1)).reshape(n_draws, *x.shape)

    def replace(self, **config_changes: Any) -> DDPMPurifier:
        """The same network with some DDPMConfig fields changed, e.g. `.replace(grad='bpda')`."""
        config = dataclasses.replace(self.config, **config_changes)
        return DDPMPurifier(self.variables, self.eps_fn, self.schedule, self.image_shape, config)
