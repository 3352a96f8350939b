"""DiffPure purification: diffuse to t*, solve the reverse VP-SDE back to t_end, with a choice of
how gradients flow through it.

    x in [0, 1] -> 2x - 1 -> x_t* = sqrt(abar) x + sqrt(1 - abar) eps
                -> reverse SDE from t* down to t_end (diffrax, fixed steps dt)
                -> (x_0 + 1) / 2   (not clipped, as in the paper)

Gradient modes (`PurifyConfig.grad`), named the same everywhere in the project:

* `exact` (default): the exact gradient of the discrete sampled path (discretise-then-optimise),
  the same noise replayed. diffrax's RecursiveCheckpointAdjoint keeps `checkpoints` states
  (default: every state, n_steps images per example; no forward step is recomputed) and the
  network's activations are recomputed step by step, never stored for the whole path.
* `adjoint`: the continuous adjoint (optimise-then-discretise) as torchsde's `sdeint_adjoint` gives
  the paper: the state is reconstructed backwards in time with the same Brownian increments and the
  adjoint integrated with Euler, both evaluated at the right end of each step. (torchsde's default
  Milstein adjoint equals Euler here because the noise is additive.) It is not the gradient of the
  computed forward path; its gap to `exact` is first order in dt, measured in
  `tests/test_gradients.py` (the numbers are in the README's "Measured" table). Non-Euler
  solvers use diffrax's BacksolveAdjoint (Stratonovich solvers only; valid because the noise is
  additive).
* `bpda`: identity in the backward pass through the purifier (the paper's BPDA+EOT attack).
* `blind`: no gradient through the purifier (`DefendedClassifier` then differentiates the
  classifier alone at x: attack the classifier, then purify).

Gradients are taken with respect to the input only, never the network parameters.

DiffPure's CelebA-HQ path (DDPM ancestral steps, not an SDE solve) is `ddpm.DDPMPurifier`,
behind the same interface (`AbstractPurifier`).

`purify_trajectory` / `Purifier.trajectory` return the same purification with the reverse
solve's states at chosen steps (a `Trajectory`), from the same solve and in every gradient mode:
the access attack losses on intermediate states need (DiffAttack, `attacks.diffattack`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
import numpy as np
from equinox.internal import unvmap_max

from . import noise
from .attacks.base import eot_keys
from .resize import resize_bilinear
from .score import SCORE_DTYPES, ScoreFn, ScoreModel, with_score_dtype
from .sde import VPSDE

GRAD_MODES = ("exact", "adjoint", "bpda", "blind")
SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "euler_heun": diffrax.EulerHeun,
    "midpoint": diffrax.Midpoint,
    "reversible_heun": diffrax.ReversibleHeun,
}
BROWNIAN_PATHS = ("grid", "tree")
INPUT_TOLERANCE = 1e-6  # images may exceed [0, 1] by this much (float round-off of attacks)


def check_checkpoints(checkpoints) -> None:
    """Refuse a `checkpoints` setting that is neither None (every state) nor an integer >= 1."""
    if checkpoints is not None and (
        isinstance(checkpoints, bool) or int(checkpoints) != checkpoints or checkpoints < 1
    ):
        raise ValueError(
            f"checkpoints must be None (every state) or an integer >= 1, got {checkpoints!r}."
        )


@dataclasses.dataclass(frozen=True)
class PurifyConfig:
    """How to purify. Defaults are DiffPure's CIFAR-10 Linf setting.

    Attributes:
      t_star: diffusion time to noise to, in (0, 1] (paper: 0.1 Linf, 0.075 L2, 0.15 ImageNet).
      dt: reverse step size; t_star / dt must be an integer (n_steps = t_star / dt).
      t_end: where the reverse solve stops, in [0, dt) (DiffPure: 1e-5; the last step is shorter).
      solver: diffrax solver name, one of SOLVERS (DiffPure: Euler-Maruyama).
      grad: gradient mode, one of GRAD_MODES.
      forward_schedule: 'discrete' (paper-exact DDPM alpha_bar) or 'continuous'.
      probability_flow: solve the probability-flow ODE instead of the reverse SDE.
      brownian: 'grid' (default, fast) or 'tree' (diffrax VirtualBrownianTree per example).
      checkpoints: states RecursiveCheckpointAdjoint keeps in `exact` mode. None (default):
        every state (`n_checkpoints` = n_steps), so the backward pass recomputes no forward step:
        the gradient costs about 3.5x the forward instead of 4.6-5x with equinox's own default
        of floor(sqrt(2 n_steps + 1/4) - 1/2) states (13 for 100 steps), and the states (one
        image each) are small next to one network VJP's working set (benchmarks/README.md,
        "Choosing the checkpoints"). An integer k < n_steps keeps k states and recomputes the
        rest.
      score_dtype: 'float32' (default) or 'bfloat16': the dtype the score network computes in.
        In 'bfloat16' its variables and the inputs of its flax layers are cast to bfloat16; the
        SDE state, time, noise and the score (the network output divided by std(t)) stay float32.
        Its error against float32 is bounded in tests/test_mixed_precision.py.
      unroll: Euler only. Run the reverse steps as straight-line code instead of a loop: the
        `exact` gradient then rematerialises each step (jax.checkpoint, one state kept per step)
        and the `adjoint` scan is unrolled. The values are the same (tests/test_purify.py);
        compile time grows with the step count, so it is meant for short solves (tens of steps).
        Its speed against the loop is measured in benchmarks/ (see benchmarks/README.md).
      input_size: side of the square images the purifier takes and returns when it differs from
        the score model's (DiffPure's ImageNet path: 224 around the 256 x 256 ADM). They are
        resized bilinearly (`resize.resize_bilinear`, align_corners=False, no antialiasing) to
        the score model's size before diffusion and back after the reverse solve, inside the
        differentiated function. None: the score model's own size, no resizing.
    """

    t_star: float = 0.1
    dt: float = 1e-3
    t_end: float = 1e-5
    solver: str = "euler"
    grad: str = "exact"
    forward_schedule: str = "discrete"
    probability_flow: bool = False
    brownian: str = "grid"
    checkpoints: int | None = None
    score_dtype: str = "float32"
    unroll: bool = False
    input_size: int | None = None

    def __post_init__(self):
        if not 0.0 < self.t_star <= 1.0:
            raise ValueError(f"t_star must be in (0, 1], got {self.t_star}.")
        if not 0.0 < self.dt <= self.t_star:
            raise ValueError(f"dt must be in (0, t_star={self.t_star}], got {self.dt}.")
        ratio = self.t_star / self.dt
        if abs(ratio - round(ratio)) > 1e-6 * max(1.0, ratio):
            raise ValueError(
                f"dt={self.dt} does not divide t_star={self.t_star} (t_star / dt = {ratio:.6g}); "
                f"choose dt = t_star / n, e.g. {self.t_star / max(1, round(ratio)):.6g}."
            )
        if not 0.0 <= self.t_end < self.dt:
            raise ValueError(f"t_end must be in [0, dt={self.dt}), got {self.t_end}.")
        if self.grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {self.grad!r}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {self.solver!r}.")
        if self.brownian not in BROWNIAN_PATHS:
            raise ValueError(f"brownian must be one of {BROWNIAN_PATHS}, got {self.brownian!r}.")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(
                f"score_dtype must be one of {SCORE_DTYPES}, got {self.score_dtype!r}."
            )
        if self.forward_schedule not in ("discrete", "continuous"):
            raise ValueError("forward_schedule must be 'discrete' or 'continuous'.")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(
                f"input_size must be a positive side in pixels, got {self.input_size}."
            )
        check_checkpoints(self.checkpoints)
        if self.unroll and self.solver != "euler":
            raise ValueError("unroll=True supports solver 'euler' only.")
        if self.grad == "adjoint" and self.solver not in ("euler", "heun", "midpoint"):
            raise ValueError(
                "grad='adjoint' supports solver 'euler' (torchsde-style adjoint) and the "
                "Stratonovich solvers 'heun' and 'midpoint' (diffrax BacksolveAdjoint)."
            )

    @property
    def n_steps(self) -> int:
        return int(round(self.t_star / self.dt))

    @property
    def n_checkpoints(self) -> int:
        """States the `exact` gradient keeps: `checkpoints`, at most n_steps (None: n_steps)."""
        n = self.n_steps
        return n if self.checkpoints is None else min(int(self.checkpoints), n)

    def time_grid(self) -> np.ndarray:
        """(n_steps + 1,) float32 decreasing times t*, t* - dt, ..., dt, t_end."""
        n = self.n_steps
        ts = self.t_star - self.dt * np.arange(n + 1, dtype=np.float64)
        ts[-1] = self.t_end
        return ts.astype(np.float32)


class ImageRangeError(ValueError):
    """Images outside [0, 1] (beyond INPUT_TOLERANCE).

    Raised as such outside jit. Inside `jax.jit` the check runs on the host and jax reports it
    as a `jax.errors.JaxRuntimeError` whose last line is `ImageRangeError: images must be in
    [0, 1], ...` (three lines in all)."""


def _range_message(lo, hi) -> str:
    return (
        f"images must be in [0, 1], got values in [{float(lo):.4g}, {float(hi):.4g}]; "
        "divide uint8 images by 255."
    )


def _range_callback(dtype, lo, hi):
    """The host side of the in-jit range check: raises ImageRangeError.

    It raises from inside a generator, so that the error's frame has no parent frames once the
    generator has finished: jax's CpuCallback error lists every frame above the raising one
    (about 15 lines, plus all of the caller's stack); this way it lists one, and the error's text
    is three lines, ours last."""

    def raiser():
        raise ImageRangeError(_range_message(lo, hi))
        yield  # a generator

    next(raiser())
    return np.ones((), dtype)  # not reached


class _DropImageRangeErrorLogs(logging.Filter):
    """jax logs a failed callback's traceback before raising it; ours says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ImageRangeError))


logging.getLogger("jax._src.callback").addFilter(_DropImageRangeErrorLogs())


def _range_guard(lo: jax.Array, hi: jax.Array, dtype) -> jax.Array:
    """1 (a scalar of `dtype`) if lo >= -tol and hi <= 1 + tol, else ImageRangeError: at once
    when lo and hi are concrete, at run time (a host callback) under jit.

    A hand-written equinox.error_if (same lax.cond around a host callback, same handling of
    vmap): equinox's own ends its message in a banner about `equinox.filter_jit` under jax.jit.
    """
    lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    with jax.ensure_compile_time_eval():
        lo, hi = -unvmap_max(-lo), unvmap_max(hi)  # over any vmapped axes too
        bad = (lo < -INPUT_TOLERANCE) | (hi > 1 + INPUT_TOLERANCE)
        if not isinstance(bad, jax.core.Tracer):
            if bool(bad):
                raise ImageRangeError(_range_message(lo, hi))
            return jnp.ones((), dtype)
    one = jax.ShapeDtypeStruct((), dtype)
    return jax.lax.cond(
        bad,
        lambda lo, hi: jax.pure_callback(functools.partial(_range_callback, dtype), one, lo, hi),
        lambda lo, hi: jnp.ones((), dtype),
        lo,
        hi,
    )


def check_images(x: jax.Array, image_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Validate a (B, H, W, C) float batch in [0, 1] and return it (the same values).

    Shape and dtype are checked at trace time (ValueError). The range, [0, 1] up to
    INPUT_TOLERANCE, is checked at once on concrete arrays (ImageRangeError, a ValueError) and
    at run time inside `jax.jit`: jax then raises a `jax.errors.JaxRuntimeError` of three short
    lines whose last line is `ImageRangeError: images must be in [0, 1], got values in [lo, hi];
    divide uint8 images by 255.` (no equinox banner, no need for `EQX_ON_ERROR` or
    `eqx.filter_jit`). On a multi-device mesh a failed run-time check aborts the process instead
    (diffpure_jax/sharding.py): validate on the host first, as `runner.run_evaluation` does.
    """
    if x.ndim != 4 or (image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape)):
        want = f"(B, {', '.join(map(str, image_shape))})" if image_shape else "(B, H, W, C)"
        raise ValueError(
            f"images must be NHWC {want} float arrays in [0, 1]; got shape {tuple(x.shape)}. "
            "(Official PyTorch code is NCHW: transpose with x.transpose(0, 2, 3, 1).)"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {x.dtype}.")
    # The check guards a scalar, not x: guarding x itself pins the host callback's operand to
    # device 0 and XLA then replicates everything after it (no speedup on a mesh).
    return x * _range_guard(jnp.min(x), jnp.max(x), x.dtype)


def _terms(sde: VPSDE, score_fn: ScoreFn, path, probability_flow: bool):
    def drift(t, y, params):
        return sde.reverse_drift(score_fn(params, y, t), y, t, probability_flow)

    if probability_flow:
        return diffrax.ODETerm(drift)

    def diffusion(t, y, params):
        return lineax.DiagonalLinearOperator(sde.diffusion(t) * jnp.ones_like(y))

    return diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, path))


def _diffrax_solve(sde, score_fn, config: PurifyConfig, params, x_t, ts, path, adjoint, steps=()):
    """(x at ts[-1], states (S, ...) at ts[steps] or None when steps is empty)."""
    if isinstance(adjoint, diffrax.BacksolveAdjoint):
        # BacksolveAdjoint's backward solve rejects a decreasing StepTo grid (diffrax 0.7.2);
        # constant steps of -dt clipped at t_end visit the same grid.
        controller, dt0 = diffrax.ConstantStepSize(), ts[1] - ts[0]
    else:
        controller, dt0 = diffrax.StepTo(ts=ts), None
    saveat = (
        diffrax.SaveAt(ts=ts[jnp.asarray(steps)], t1=True) if steps else diffrax.SaveAt(t1=True)
    )
    sol = diffrax.diffeqsolve(
        _terms(sde, score_fn, path, config.probability_flow),
        SOLVERS[config.solver](),
        t0=ts[0],
        t1=ts[-1],
        dt0=dt0,
        y0=x_t,
        args=params,
        stepsize_controller=controller,
        adjoint=adjoint,
        saveat=saveat,
        max_steps=config.n_steps,
    )
    return sol.ys[-1], (sol.ys[:-1] if steps else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _euler_adjoint_solve(sde, score_fn, config, steps, params, x_t, ts, path):
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=config.n_checkpoints)
    return _diffrax_solve(sde, score_fn, config, params, x_t, ts, path, adjoint, steps)


def _euler_adjoint_fwd(sde, score_fn, config, steps, params, x_t, ts, path):
    out = _euler_adjoint_solve(sde, score_fn, config, steps, params, x_t, ts, path)
    return out, (out[0], params, ts, path)


def _euler_adjoint_bwd(sde, score_fn, config, steps, residuals, cotangents):
    """Integrate the adjoint backwards from t_end to t*, reconstructing the state on the way;
    the cotangents of saved states (`steps`) join the adjoint when it passes their step."""
    x_0, params, ts, path = residuals
    a_0, a_states = cotangents
    # slot[k]: the position of step k in `steps`, or -1 (no cotangent enters there).
    slot = np.full(config.n_steps + 1, -1, np.int32)
    slot[list(steps)] = np.arange(len(steps))
    slot = jnp.asarray(slot)

    def joined(a, k):
        if not steps:
            return a
        s = slot[k]
        return a + jnp.where(s >= 0, a_states[jnp.maximum(s, 0)], jnp.zeros_like(a))

    def step(carry, k):
        x, a = carry
        a = joined(a, k + 1)
        t, dt = ts[k + 1], ts[k] - ts[k + 1]
        # The reverse-time drift with time running forwards (DiffPure's RevVPSDE.f).
        drift, vjp = jax.vjp(
            lambda y: -sde.reverse_drift(score_fn(params, y, t), y, t, config.probability_flow),
            x,
        )
        x_prev = x - drift * dt
        if not config.probability_flow:
            # The increment the forward step k applied, replayed (any Brownian path).
            x_prev = x_prev + sde.diffusion(t) * path.evaluate(ts[k + 1], ts[k])
        return (x_prev, a + vjp(a)[0] * dt), None

    ks = jnp.arange(config.n_steps - 1, -1, -1)
    unroll = config.n_steps if config.unroll else 1
    (_, a_t), _ = jax.lax.scan(step, (x_0, a_0), ks, unroll=unroll)
    a_t = joined(a_t, 0)
    zeros = functools.partial(jax.tree.map, lambda v: None)
    return zeros(params), a_t, None, zeros(path)


_euler_adjoint_solve.defvjp(_euler_adjoint_fwd, _euler_adjoint_bwd)


def check_steps(steps, n_steps: int) -> tuple[int, ...]:
    """`steps` as a tuple of ints, refused unless strictly increasing in [0, n_steps]."""
    steps = tuple(int(k) for k in steps)
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or (
        steps and not 0 <= steps[0] <= steps[-1] <= n_steps
    ):
        raise ValueError(
            f"steps must be strictly increasing step indices in [0, {n_steps}] (0: the diffused "
            f"input, {n_steps}: the end of the reverse solve), got {steps[:6]}"
            + (" ..." if len(steps) > 6 else "")
        )
    return steps


def reverse_solve_states(
    sde: VPSDE, score_fn: ScoreFn, config: PurifyConfig, params, x_t, ts, path, steps=()
) -> tuple[jax.Array, jax.Array | None]:
    """`reverse_solve` that also returns the states at chosen steps, from the same solve.

    steps: strictly increasing step indices k in [0, n_steps]; the state at step k is the
    solution at ts[k] (k = 0: x_t itself; k = n_steps: the returned x_0). Returns (x_0, states
    (S, *x_t.shape)), states None when steps is empty. Gradients flow through the states as
    through x_0, in the same mode: `exact` (diffrax saves them inside the checkpointed solve),
    `adjoint` (their cotangents join the adjoint at their step), unrolled Euler.
    """
    steps = check_steps(steps, config.n_steps)
    if config.grad == "adjoint":
        if config.solver == "euler":
            return _euler_adjoint_solve(sde, score_fn, config, steps, params, x_t, ts, path)
        adjoint = diffrax.BacksolveAdjoint(solver=SOLVERS[config.solver]())
        return _diffrax_solve(sde, score_fn, config, params, x_t, ts, path, adjoint, steps)
    if config.unroll:
        return _unrolled_euler(sde, score_fn, config, params, x_t, ts, path, steps)
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=config.n_checkpoints)
    return _diffrax_solve(sde, score_fn, config, params, x_t, ts, path, adjoint, steps)


def reverse_solve(
    sde: VPSDE, score_fn: ScoreFn, config: PurifyConfig, params, x_t, ts, path
) -> jax.Array:
    """Solve the reverse SDE (or ODE) from ts[0] to ts[-1] on the grid `ts`.

    x_t: (B, H, W, C) in the model's [-1, 1] scale; `path` gives the Brownian increments.
    Differentiable in x_t as `config.grad` says (`bpda`/`blind` are handled by `purify`).
    """
    return reverse_solve_states(sde, score_fn, config, params, x_t, ts, path)[0]


def _unrolled_euler(sde, score_fn, config, params, x_t, ts, path, steps=()):
    """Euler(-Maruyama) on `ts` as straight-line code, each step rematerialised in the backward
    pass: the same update as diffrax.Euler, y + f(t_k, y) (t_{k+1} - t_k) + g(t_k) dW_k."""

    @jax.checkpoint
    def step(y, t0, t1):
        y_next = y + sde.reverse_drift(score_fn(params, y, t0), y, t0, config.probability_flow) * (
            t1 - t0
        )
        if config.probability_flow:
            return y_next
        return y_next + sde.diffusion(t0) * path.evaluate(t0, t1)

    y, states = x_t, {}
    for k in range(config.n_steps):
        if k in steps:
            states[k] = y
        y = step(y, ts[k], ts[k + 1])
    states[config.n_steps] = y
    return y, (jnp.stack([states[k] for k in steps]) if steps else None)


def make_path(config: PurifyConfig, keys, image_shape, dtype=jnp.float32, ts=None):
    """The Brownian path of `config.brownian` for per-example keys (B,), in the state's dtype."""
    if config.brownian == "tree":
        # The tree's range covers the float32 grid (float32(t*) may exceed t* slightly).
        t_hi = float(np.float32(config.t_star)) * (1 + 1e-6)
        return noise.TreeBrownianPath(0.0, t_hi, config.dt / 2, keys, tuple(image_shape), dtype)
    ts = jnp.asarray(config.time_grid() if ts is None else ts, dtype)
    return noise.GridBrownianPath(ts, jnp.sqrt(ts[:-1] - ts[1:]), keys, tuple(image_shape), dtype)


def input_shape(score: ScoreModel, config: PurifyConfig) -> tuple[int, int, int]:
    """(H, W, C) of the images a purifier of `score` with `config` takes and returns."""
    if config.input_size is None:
        return tuple(score.image_shape)
    return (config.input_size, config.input_size, score.image_shape[-1])


class Trajectory(NamedTuple):
    """One purification with the states of its reverse solve at chosen steps.

    purified: (B, H, W, C) the purified images, as `purify` returns them (image scale).
    steps: (S,) int, the step indices k asked for (0: the diffused input x_t*, n_steps: the end
      of the reverse solve); times: (S,) float32, their diffusion times.
    reverse: (S, B, h, w, c) the reverse process's states x'_t at those steps, in the model's
      [-1, 1] scale at the score model's size (h, w, c).
    diffused: (S, B, h, w, c) the forward diffusion of the same input to the same times with the
      same forward noise eps, x_t = sqrt(abar(t)) (2x - 1) + sqrt(1 - abar(t)) eps (what the
      reverse process would track if it undid the diffusion exactly; DiffAttack's x_t). VP-SDE:
      the continuous abar(t) (at step 0 it differs from x_t*, made with the discrete schedule,
      by about 1e-3 relative); DDPM: the chain's own alphas_cumprod.
    alpha_bar: (S,) float32, the abar(t) of each step's diffused state (1 at t = 0).

    Gradients: `exact` and `adjoint` flow through `reverse` as through `purified`; in `bpda`
    `reverse` carries none (the purifier is the identity in the backward pass) and `diffused`
    its closed-form one; in `blind` nothing carries a gradient.
    """

    purified: jax.Array
    steps: jax.Array
    times: jax.Array
    reverse: jax.Array
    diffused: jax.Array
    alpha_bar: jax.Array


def trajectory_with_keys(
    score: ScoreModel,
    config: PurifyConfig,
    x: jax.Array,
    keys: jax.Array,
    steps=(),
    reverse_keys: jax.Array | None = None,
) -> Trajectory:
    """`purify_with_keys` with the reverse solve's states at `steps` (a `Trajectory`; one solve).

    steps: strictly increasing step indices in [0, n_steps] (a static tuple).

    The images are checked here (at once when concrete), then the purification is one compiled
    program (`equinox.filter_jit`, keyed by the config, the steps and the shapes): called
    outside `jax.jit`, a second call with the same shapes does not recompile the solver (diffrax
    builds new terms on each call, which a bare eager call would trace and compile again)."""
    x = check_images(x, input_shape(score, config))
    steps = check_steps(steps, config.n_steps)
    return _trajectory(score, config, x, keys, steps, reverse_keys)


@eqx.filter_jit
def _trajectory(score, config, x, keys, steps, reverse_keys) -> Trajectory:
    x_in = resize_bilinear(x, score.image_shape[:2])
    eps = noise.forward_noise(keys, x_in.shape[1:], x.dtype)
    x_t = score.sde.diffuse(2.0 * x_in - 1.0, eps, config.t_star, config.forward_schedule)
    ts = jnp.asarray(config.time_grid(), x.dtype)
    path = make_path(
        config, keys if reverse_keys is None else reverse_keys, x_in.shape[1:], x.dtype, ts
    )
    score_fn = with_score_dtype(score.score_fn, config.score_dtype)
    x_0, states = reverse_solve_states(
        score.sde, score_fn, config, score.variables, x_t, ts, path, steps
    )
    out = resize_bilinear((x_0 + 1.0) / 2.0, x.shape[1:3])
    times = ts[jnp.asarray(steps, jnp.int32)]
    log_abar = score.sde.log_alpha_bar(times)[:, None, None, None, None]
    # sqrt(1 - abar) as sqrt(-expm1(log abar)): exact near t = 0, where 1 - abar ~ 1e-6.
    diffused = jnp.exp(0.5 * log_abar) * (2.0 * x_in - 1.0) + jnp.sqrt(-jnp.expm1(log_abar)) * eps
    if states is None:
        states = jnp.zeros((0, *x_t.shape), x.dtype)
    if config.grad == "bpda":
        out = x + jax.lax.stop_gradient(out - x)
        states = jax.lax.stop_gradient(states)
    elif config.grad == "blind":
        out, states, diffused = jax.lax.stop_gradient((out, states, diffused))
    abar = jnp.exp(log_abar[:, 0, 0, 0, 0])
    return Trajectory(out, jnp.asarray(steps, jnp.int32), times, states, diffused, abar)


def purify_with_keys(
    score: ScoreModel,
    config: PurifyConfig,
    x: jax.Array,
    keys: jax.Array,
    reverse_keys: jax.Array | None = None,
) -> jax.Array:
    """Purify x (N, H, W, C) in [0, 1] with one noise key per row (N,). Returns (N, H, W, C).

    reverse_keys (N,): other keys for the reverse SDE's noise only (default: keys), to draw
    several reverse solves from the same diffused image x_t*. With `config.input_size`, x is
    (N, input_size, input_size, C), resized to the score model's size and back."""
    return trajectory_with_keys(score, config, x, keys, (), reverse_keys).purified


def diffuse_images(x: jax.Array, eps: jax.Array, t_star: float) -> jax.Array:
    """The forward diffusion x_t* of images, in image units: the input of the reverse solve.

    x: (B, H, W, C) images in [0, 1]; eps: standard normal noise of the same shape (e.g.
    `noise.forward_noise(keys, ...)`, the noise a purification with those keys draws). Uses
    DiffPure's discrete VP-SDE schedule on 2x - 1 and maps the result back with (y + 1) / 2.
    Returns (B, H, W, C), not clipped (about [0, 1] plus noise of std sqrt(1 - alpha_bar(t*)) / 2).
    """
    return (VPSDE().diffuse(2.0 * x - 1.0, eps, t_star) + 1.0) / 2.0


def _index(x, index):
    return jnp.arange(x.shape[0]) if index is None else jnp.asarray(index)


def purify(
    score: ScoreModel,
    config: PurifyConfig,
    x: jax.Array,
    key: jax.Array,
    index: jax.Array | None = None,
) -> jax.Array:
    """One purification of a batch.

    Args:
      score: the score model (pytree; pass it through jit as an argument).
      config: PurifyConfig (static).
      x: (B, H, W, C) float images in [0, 1].
      key: PRNG key. Noise is a function of (key, index, step); another draw of the same input
        is another key (EOT draws: `diffpure_jax.attacks.base.eot_keys`).
      index: (B,) int dataset indices of the examples; default arange(B). Pass the real indices to
        make each example's noise independent of the batch it is in.
    Returns: (B, H, W, C) purified images, about [0, 1] (not clipped).
    """
    return purify_with_keys(score, config, x, noise.example_keys(key, _index(x, index)))


def purify_trajectory(
    score: ScoreModel,
    config: PurifyConfig,
    x: jax.Array,
    key: jax.Array,
    steps,
    index: jax.Array | None = None,
) -> Trajectory:
    """`purify` (the same noise, the same purified images) with the reverse solve's states at
    `steps`, strictly increasing step indices in [0, n_steps] (static): a `Trajectory`."""
    keys = noise.example_keys(key, _index(x, index))
    return trajectory_with_keys(score, config, x, keys, steps)


def purify_eot(
    score: ScoreModel,
    config: PurifyConfig,
    x: jax.Array,
    key: jax.Array,
    n_draws: int,
    index: jax.Array | None = None,
) -> jax.Array:
    """n_draws purifications of the same batch in one batched solve: (n_draws, B, H, W, C).

    Draw d equals `purify(..., eot_keys(key, n_draws)[d], index)`.
    """
    idx = _index(x, index)
    keys = jax.vmap(lambda k: noise.example_keys(k, idx))(eot_keys(key, n_draws))
    flat = jnp.broadcast_to(x[None], (n_draws, *x.shape)).reshape(-1, *x.shape[1:])
    out = purify_with_keys(score, config, flat, keys.reshape(-1))
    return out.reshape(n_draws, *x.shape)


class AbstractPurifier(eqx.Module):
    """What `defense.DefendedClassifier` needs of a purifier (a pytree): `purifier(x, key,
    index=None)`, `purify_with_keys`, `trajectory`, `n_steps`, `eot`, `replace` and a static
    `config` with a `grad` mode. Implemented by
    `Purifier` (VP-SDE) and `ddpm.DDPMPurifier` (DDPM ancestral steps).

    `config` is not declared here (an abstract field would come first in every subclass's
    positional arguments): each subclass has it as its last field."""

    @abc.abstractmethod
    def __call__(self, x: jax.Array, key: jax.Array, index: jax.Array | None = None) -> jax.Array:
        """x (B, H, W, C) in [0, 1]; key a PRNG key; index (B,) int dataset indices or None
        (then arange(B)). Returns (B, H, W, C) purified images, about [0, 1] (not clipped)."""

    @abc.abstractmethod
    def purify_with_keys(self, x: jax.Array, keys: jax.Array) -> jax.Array:
        """x (N, H, W, C) in [0, 1] purified with one noise key per row, keys (N,): row n equals
        row b of `self(x', key, index)` when keys[n] = `noise.example_keys(key, index)[b]`
        (per-example draws, e.g. DiffHammer's selected draw of each example)."""

    @abc.abstractmethod
    def trajectory(self, x: jax.Array, key: jax.Array, steps, index=None) -> Trajectory:
        """`self(x, key, index)` with the states of its reverse process at `steps` (strictly
        increasing step indices in [0, n_steps], static; 0 is the diffused input): a
        `Trajectory` whose `purified` equals `self(x, key, index)`."""

    @property
    @abc.abstractmethod
    def n_steps(self) -> int:
        """The number of reverse steps (the valid trajectory steps are 0 .. n_steps)."""

    @abc.abstractmethod
    def eot(self, x: jax.Array, key: jax.Array, n_draws: int, index=None) -> jax.Array:
        """(n_draws, B, H, W, C) purifications; draw d is `self(x, eot_keys(key, n_draws)[d],
        index)`."""

    @abc.abstractmethod
    def replace(self, **config_changes: Any) -> AbstractPurifier:
        """The same model with some config fields changed, e.g. `.replace(grad='bpda')`."""


class Purifier(AbstractPurifier):
    """`purifier(x, key, index=None)`: a ScoreModel bound to a PurifyConfig (a pytree)."""

    score: ScoreModel
    config: PurifyConfig = eqx.field(static=True)

    def __call__(self, x, key, index=None):
        return purify(self.score, self.config, x, key, index)

    def purify_with_keys(self, x, keys):
        return purify_with_keys(self.score, self.config, x, keys)

    def trajectory(self, x, key, steps, index=None):
        return purify_trajectory(self.score, self.config, x, key, steps, index)

    @property
    def n_steps(self) -> int:
        return self.config.n_steps

    def eot(self, x, key, n_draws: int, index=None):
        return purify_eot(self.score, self.config, x, key, n_draws, index)

    def replace(self, **config_changes: Any) -> Purifier:
        """The same score model with some config fields changed, e.g. `.replace(grad='bpda')`."""
        return Purifier(self.score, dataclasses.replace(self.config, **config_changes))
