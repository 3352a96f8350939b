"""Certified L2 robustness: randomized smoothing, and diffusion denoised smoothing on our models.

Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019, "Certified Adversarial Robustness
via Randomized Smoothing"). The smoothed classifier of a base classifier f at noise level sigma
is g(x) = argmax_c P(f(x + sigma eps) = c), eps ~ N(0, I), with images x in [0, 1]. If the top
class c_A has probability at least pA > 1/2, g is constant on the L2 ball of radius
sigma * Phi^-1(pA) around x. The Monte Carlo algorithms of the paper:

* `certify` (CERTIFY): n0 selection samples give the guess c_A (the most frequent class); n
  fresh estimation samples count it, n_A; pA_lower is the one-sided (1 - alpha) Clopper-Pearson
  lower bound of n_A / n. If pA_lower > 1/2 the result is (c_A, radius sigma * Phi^-1(pA_lower)),
  else an abstention (label -1, radius 0). With probability at least 1 - alpha over the noise, a
  non-abstaining result is g's prediction and g is robust within that radius.
* `predict` (PREDICT): n samples; the top two counts n_1 >= n_2; a two-sided binomial test of
  n_1 against Bin(n_1 + n_2, 1/2) at level alpha: c_1 if its p-value is <= alpha, else -1. A tie
  always abstains.

Defaults are the paper's: alpha = 0.001, n0 = 100, n = 100,000.

Diffusion denoised smoothing (Carlini, Tramer, Dvijotham, Rice, Sun and Kolter, ICLR 2023,
"(Certified!!) Adversarial Robustness for Free!"): the base classifier is f(denoise(x + sigma eps))
with an off-the-shelf diffusion model as a one-shot denoiser. The diffusion models work in
[-1, 1], where the smoothing noise has std 2 sigma, so the diffusion level is the one with
(1 - abar) / abar = (2 sigma)^2, i.e. abar = 1 / (1 + 4 sigma^2), and

    x_t = sqrt(abar) (2 (x + sigma eps) - 1)    (= sqrt(abar) (2x - 1) + sqrt(1 - abar) eps)
    x0  = (x_t - sqrt(1 - abar) eps_hat(x_t, t)) / sqrt(abar),  clipped to [-1, 1]
    denoised = (x0 + 1) / 2

(`OneShotDenoiser`, built by `diffusion_denoiser`). The clip to [-1, 1] is the paper's code's
(guided-diffusion's `p_sample(..., clip_denoised=True)["pred_xstart"]`); `clip=False` turns it
off. Where the network's noise level is only approximately abar (the discrete models below), the
certificate is unaffected: the smoothing noise is exactly sigma in image space, and the denoiser
is just some deterministic function applied before f.

* VP-SDE `ScoreModel`s with continuous time (our CIFAR-10 NCSN++ and Fashion-MNIST models,
  `eps_continuous`): t solves log abar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) =
  -log(1 + 4 sigma^2) in closed form (`vp_time_for_sigma`), abar(t) is exactly 1 / (1 + 4 sigma^2)
  and eps_hat = -std(t) score(x_t, t), the network's eps.
* The guided-diffusion ADM (`guided_diffusion` parameterisation, ImageNet), a ScoreModel whose
  network takes the integer timestep floor(1000 t) and was trained on the discrete linear
  schedule: the timestep k is the one whose discrete abar_k (float64 cumprod of 1 - linspace(
  beta_min / N, beta_max / N, N), guided-diffusion's schedule) is nearest to 1 / (1 + 4 sigma^2),
  that abar_k is used exactly in the two formulas above, and the network is queried at
  t = (k + 1/2) / N (so floor(N t) = k; the score's division by std(t) is undone). Detected from
  the score function (`score.guided_diffusion_score_fn`); `timesteps="integer"` forces it for
  another integer-time score function.
* DDPM eps networks (`ddpm.DDPMPurifier`, SDEdit's CelebA-HQ model): the timestep k whose
  `schedule.alphas_cumprod[k]` is nearest to 1 / (1 + 4 sigma^2), that abar used exactly, and
  eps_hat = `eps_fn(variables, x_t, k)`. (Carlini et al. take the first k whose noise level
  reaches 2 sigma instead of the nearest; both are valid certificates.)

DensePure-style (Xiao et al., 2023), optionally: `diffusion_denoiser(..., n_reverse=R,
n_steps=S)` replaces the one x0 prediction by R full reverse-SDE solves from the same x_t (the
VP-SDE at continuous time t, `purify.reverse_solve` with t_star = t and dt = t / S, Euler-Maruyama
by default, each run its own Brownian noise), each run's output classified and the majority vote
of the R labels taken as ONE base-classifier output (ties: the smaller label). It costs R * S
network calls per noise sample. Only for VP-SDE ScoreModels (a DDPM denoiser refuses it). The
output is clipped to [-1, 1] like the one-shot one (`clip`).

Noise and batching. Every random number is a pure function of (key, dataset index, sample j):
sample j of example i uses `fold_in(noise.example_keys(key, index, stream)[i], j)`, its
smoothing eps from `fold_in(sample key, 0)` and a DensePure run r's noise from
`fold_in(fold_in(sample key, 1), r)`. The selection, estimation and PREDICT samples are three
independent streams (`SELECTION`, `ESTIMATION`, `PREDICTION`). Counting (`sample_counts`) is one
jitted `lax.scan` over chunks of `batch` noise samples: each chunk is a single batched call of
the base classifier on (B * batch) images (B examples), its labels accumulated as int32 (B, K)
counts (the last chunk masked). So counts do not depend on `batch` nor on which examples share
a batch, and 100,000 samples an image are a matter of throughput. The images of a batch are
split over the local devices (`sharding.run_sharded`, as the evaluation runner does); the noise
samples stay batched per chunk on each device. Memory: one chunk holds B * batch (times R for
DensePure) images' activations.

The statistics are host-side float64 functions of the counts, on `scipy.stats` (a dependency
of jax): `clopper_pearson_lower` (the Beta quantile), `binomial_test_pvalue` (two-sided,
p = 1/2, `binomtest`) and `normal_ppf`.

Usage:

    from diffpure_jax import load_classifier, load_score_model
    from diffpure_jax.certify import run_certification, smoothed_classifier

    score = load_score_model("checkpoints/fmnist-ncsnpp-small")
    classifier = load_classifier("checkpoints/fmnist-wrn-16-1")
    smoothed = smoothed_classifier(classifier, sigma=0.25, denoiser=score)  # a pytree
    result = smoothed.certify(x, jax.random.key(0), index, n0=100, n=10_000, batch=200)
    result.prediction, result.radius  # (B,) NumPy: the label or -1, the certified L2 radius
    summary = run_certification(smoothed, x, y, index, "runs/fmnist-certify-0.25", n=10_000)
    summary["certified_accuracy"]  # {"0": ..., "0.25": ..., ...}: fractions of the examples

`smoothed_classifier(classifier, sigma)` without a denoiser is plain randomized smoothing of the
classifier (Cohen et al.). `run_certification` writes one JSON line per example to
`records.jsonl` (fsynced batch by batch; a rerun skips the examples already there and refuses a
workdir made with other settings), the wall time of the counting to `timings.jsonl`
(`noise_samples_per_second`) and the certified accuracy at chosen radii with the abstention rate
to `summary.json` / `summary.md`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from . import noise, sharding
from .classifier import Classifier
from .ddpm import DDPMPurifier
from .progress import progress_bar_or_none
from .purify import (
    INPUT_TOLERANCE,
    ImageRangeError,
    Purifier,
    PurifyConfig,
    make_path,
    reverse_solve,
)
from .runner import (
    PROCESS_TIMINGS,
    SUMMARY_JSON,
    SUMMARY_MD,
    TIMINGS,
    _fsync_append,
    merge_records,
    read_records,
    read_timings,
    records_path,
)
from .score import LowPrecisionScoreFn, ScoreModel, guided_diffusion_score_fn, with_score_dtype
from .sde import VPSDE
from .workdir import check_run_config, truncate_torn_tail

ABSTAIN = -1
# The noise streams (the `draw` of `noise.example_keys`): independent samples for each use.
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2
SMOOTHING_NOISE, DENOISER_NOISE = 0, 1  # fold_in(sample key, .)
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


# -- statistics on the counts (host side, float64, no scipy) -------------------------------------


# Stirling's series of lgamma(x) - ((x - 1/2) log x - x + log(2 pi) / 2): B_2k / (2k (2k - 1)).
def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Bin(n, p) (1 for k <= 0, 0 for k > n)."""
    return float(scipy.stats.binom.sf(int(k) - 1, int(n), float(p)))


def clopper_pearson_lower(k: int, n: int, alpha: float = 0.001) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower confidence bound of a binomial proportion
    from k successes in n trials: the alpha quantile of Beta(k, n - k + 1), the p with
    P(Bin(n, p) >= k) = alpha (Cohen et al.'s `proportion_confint(k, n, 2 alpha, "beta")[0]`);
    0 for k = 0."""
    k, n = int(k), int(n)
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    return float(scipy.stats.beta.ppf(alpha, k, n - k + 1))


def binomial_test_pvalue(k: int, n: int) -> float:
    """The two-sided p-value of k successes in n trials against Bin(n, 1/2)
    (`scipy.stats.binomtest`); 1 for a tie or n = 0."""
    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0 or 2 * k == n:
        return 1.0
    return float(scipy.stats.binomtest(k, n, 0.5).pvalue)


def normal_ppf(p: float) -> float:
    """Phi^-1(p), the standard normal quantile."""
    return float(scipy.stats.norm.ppf(float(p)))


def normal_cdf(z: float) -> float:
    return float(scipy.stats.norm.cdf(float(z)))


class PredictResult(NamedTuple):
    """PREDICT per example (NumPy arrays, B rows). prediction: the top class or -1 (abstain);
    counts: (B, K) int class counts of the n samples; pvalue: the binomial test's p-value."""

    prediction: np.ndarray
    counts: np.ndarray
    pvalue: np.ndarray


class CertifyResult(NamedTuple):
    """CERTIFY per example (NumPy arrays, B rows).

    prediction: c_A, or -1 where it abstains; radius: the certified L2 radius (0 where it
    abstains), in image units ([0, 1] pixels); guess: c_A, the top class of the selection
    samples (also where it abstains); count_a: n_A, c_A's count among the n estimation samples;
    pa_lower: the Clopper-Pearson lower bound of pA; counts: (B, K) int estimation counts;
    selection_counts: (B, K) int counts of the n0 selection samples."""

    prediction: np.ndarray
    radius: np.ndarray
    guess: np.ndarray
    count_a: np.ndarray
    pa_lower: np.ndarray
    counts: np.ndarray
    selection_counts: np.ndarray


def predict_from_counts(counts, alpha: float = 0.001) -> PredictResult:
    """PREDICT's decision from (B, K) counts: the top class if the binomial test of the top two
    counts rejects at `alpha`, else -1 (a tie always abstains)."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    rows = np.arange(len(counts))
    n1, n2 = counts[rows, top], counts[rows, second]
    pvalue = np.array([binomial_test_pvalue(a, a + b) for a, b in zip(n1, n2, strict=True)])
    prediction = np.where(pvalue <= alpha, top, ABSTAIN).astype(np.int64)
    return PredictResult(prediction, counts, pvalue)


def certify_from_counts(selection_counts, counts, sigma: float, alpha: float = 0.001):
    """CERTIFY's decision from the (B, K) selection and estimation counts: c_A = the selection
    argmax, pA_lower = `clopper_pearson_lower(n_A, n, alpha)` (n: the row sums of `counts`),
    radius sigma * Phi^-1(pA_lower) if pA_lower > 1/2, else an abstention (-1, radius 0)."""
    selection_counts, counts = np.asarray(selection_counts), np.asarray(counts)
    guess = np.argmax(selection_counts, axis=1)
    count_a = counts[np.arange(len(counts)), guess]
    n = counts.sum(axis=1)
    pa_lower = np.array(
        [clopper_pearson_lower(k, m, alpha) for k, m in zip(count_a, n, strict=True)]
    )
    certified = pa_lower > 0.5
    radius = np.array(
        [sigma * normal_ppf(p) if c else 0.0 for p, c in zip(pa_lower, certified, strict=True)]
    )
    prediction = np.where(certified, guess, ABSTAIN).astype(np.int64)
    return CertifyResult(prediction, radius, guess, count_a, pa_lower, counts, selection_counts)


# -- sigma -> diffusion level ---------------------------------------------------------------------


def target_alpha_bar(sigma: float) -> float:
    """1 / (1 + 4 sigma^2): the abar at which the [-1, 1]-scale noise std 2 sigma, scaled by
    sqrt(abar), is the diffusion's sqrt(1 - abar)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return 1.0 / (1.0 + 4.0 * sigma * sigma)


def vp_time_for_sigma(sde: VPSDE, sigma: float) -> float:
    """The continuous time t with (1 - abar(t)) / abar(t) = (2 sigma)^2 for the VP-SDE: the root
    of (beta_max - beta_min) t^2 / 2 + beta_min t = log(1 + 4 sigma^2), in the stable form
    2 L / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) L))."""
    log_ratio = math.log1p(4.0 * sigma * sigma)
    d = sde.beta_max - sde.beta_min
    t = 2.0 * log_ratio / (sde.beta_min + math.sqrt(sde.beta_min**2 + 2.0 * d * log_ratio))
    if not 0.0 < t <= 1.0:
        raise ValueError(f"sigma={sigma} needs diffusion time t={t:.4g}, outside (0, 1].")
    return t


def discrete_vp_alphas_cumprod(sde: VPSDE) -> np.ndarray:
    """(N,) float64 abar of the discrete linear schedule the VP-SDE's continuous one comes from
    (guided-diffusion's "linear" schedule for N = 1000): cumprod(1 - linspace(beta_min / N,
    beta_max / N, N))."""
    n = sde.n_discrete
    return np.cumprod(1.0 - np.linspace(sde.beta_min / n, sde.beta_max / n, n))


def nearest_timestep(alphas_cumprod, sigma: float) -> int:
    """The index k of the discrete abar_k nearest to 1 / (1 + 4 sigma^2)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return int(np.argmin(np.abs(abar - target_alpha_bar(sigma))))


# -- denoisers -----------------------------------------------------------------------------------


class AbstractDenoiser(eqx.Module):
    """`denoiser(x_noisy, keys)` -> (n_votes, N, H, W, C) denoised images in [0, 1] scale:
    x_noisy (N, H, W, C) = x + sigma eps (image scale), keys (N,) one key per noisy image (used
    by random denoisers only). A pytree; `describe()` is its identity in a run's settings."""

    @abc.abstractmethod
    def __call__(self, x_noisy: jax.Array, keys: jax.Array) -> jax.Array: ...

    @property
    @abc.abstractmethod
    def n_votes(self) -> int:
        """How many denoised images (majority vote) make one base-classifier output."""

    @abc.abstractmethod
    def describe(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class ScoreEps:
    """eps_hat = -std(t) score(x, t) of a VP-SDE score function: the network's eps (hashable,
    a static field). (params, x (N, H, W, C), t (N,)) -> (N, H, W, C)."""

    score_fn: Callable
    sde: VPSDE

    def __call__(self, params, x, t):
        return -self.sde.std(t)[:, None, None, None] * self.score_fn(params, x, t)


class OneShotDenoiser(AbstractDenoiser):
    """Carlini et al.'s one-shot denoiser: x0 = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) at
    x_t = sqrt(abar) (2 x_noisy - 1), clipped to [-1, 1] when `clip`, returned as (x0 + 1) / 2.

    Attributes: `variables` (the network's); `eps_fn(variables, x_t, level)` (static), level
    (N,) the value `level` broadcast (a continuous time for `ScoreEps`, an int32 DDPM timestep
    for an eps network); `alpha_bar` the abar used in both formulas; `image_shape`; `clip`;
    `kind` ('vp_continuous', 'vp_integer' or 'ddpm', for `describe`). Build it with
    `diffusion_denoiser`."""

    variables: Any
    eps_fn: Callable = eqx.field(static=True)
    level: float | int = eqx.field(static=True)
    alpha_bar: float = eqx.field(static=True)
    image_shape: tuple[int, int, int] = eqx.field(static=True)
    clip: bool = eqx.field(static=True, default=True)
    kind: str = eqx.field(static=True, default="vp_continuous")

    @property
    def n_votes(self) -> int:
        return 1

    def denoise(self, x_noisy: jax.Array) -> jax.Array:
        """(N, H, W, C) image-scale noisy images -> (N, H, W, C) denoised images."""
        dtype = x_noisy.dtype
        a = np.float32(math.sqrt(self.alpha_bar))
        s = np.float32(math.sqrt(1.0 - self.alpha_bar))
        x_t = a * (2.0 * x_noisy - 1.0)
        level_dtype = jnp.int32 if isinstance(self.level, int) else dtype
        level = jnp.full(x_noisy.shape[:1], self.level, level_dtype)
        eps = self.eps_fn(self.variables, x_t, level).astype(dtype)
        x0 = (x_t - s * eps) / a
        if self.clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
        return (x0 + 1.0) / 2.0

    def __call__(self, x_noisy, keys=None):
        return self.denoise(x_noisy)[None]

    def describe(self) -> dict:
        return {
            "denoiser": "one_shot",
            "kind": self.kind,
            "level": self.level,
            "alpha_bar": float(self.alpha_bar),
            "clip": self.clip,
        }


class ReverseDenoiser(AbstractDenoiser):
    """DensePure-style: `n_reverse` reverse-SDE solves of `score` from x_t = sqrt(abar(t))
    (2 x_noisy - 1), t = `config.t_star` (abar(t) = 1 / (1 + 4 sigma^2) exactly), on the grid of
    `config` (dt = t / n_steps); run r of noisy image n draws its Brownian noise from
    fold_in(keys[n], r). Returns the (n_reverse, N, H, W, C) outputs, clipped to [-1, 1] in model
    scale when `clip`, in image scale. Build it with `diffusion_denoiser(..., n_reverse=)`."""

    score: ScoreModel
    config: PurifyConfig = eqx.field(static=True)
    n_reverse: int = eqx.field(static=True)
    clip: bool = eqx.field(static=True, default=True)

    @property
    def n_votes(self) -> int:
        return self.n_reverse

    def __call__(self, x_noisy, keys):
        n, shape, dtype = x_noisy.shape[0], x_noisy.shape[1:], x_noisy.dtype
        sde = self.score.sde
        abar = math.exp(float(sde.log_alpha_bar(self.config.t_star)))
        x_t = np.float32(math.sqrt(abar)) * (2.0 * x_noisy - 1.0)
        runs = jnp.arange(self.n_reverse)
        run_keys = jax.vmap(lambda r: jax.vmap(lambda k: jax.random.fold_in(k, r))(keys))(runs)
        flat = jnp.broadcast_to(x_t[None], (self.n_reverse, *x_t.shape)).reshape(-1, *shape)
        ts = jnp.asarray(self.config.time_grid(), dtype)
        path = make_path(self.config, run_keys.reshape(-1), shape, dtype, ts)
        score_fn = with_score_dtype(self.score.score_fn, self.config.score_dtype)
        x0 = reverse_solve(sde, score_fn, self.config, self.score.variables, flat, ts, path)
        if self.clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
        return ((x0 + 1.0) / 2.0).reshape(self.n_reverse, n, *shape)

    def describe(self) -> dict:
        c = self.config
        return {
            "denoiser": "reverse",
            "t": c.t_star,
            "n_steps": c.n_steps,
            "n_reverse": self.n_reverse,
            "solver": c.solver,
            "probability_flow": c.probability_flow,
            "clip": self.clip,
        }


def _uses_integer_timesteps(score_fn) -> bool:
    """Whether a score function is `score.guided_diffusion_score_fn`'s (network fed floor(N t))."""
    if isinstance(score_fn, LowPrecisionScoreFn):
        score_fn = score_fn.score_fn
    code = getattr(score_fn, "__code__", None)
    return code is not None and code is guided_diffusion_score_fn(None).__code__


def diffusion_denoiser(
    model: ScoreModel | Purifier | DDPMPurifier,
    sigma: float,
    *,
    clip: bool = True,
    timesteps: str = "auto",
    n_reverse: int = 0,
    n_steps: int = 10,
    solver: str = "euler",
    score_dtype: str = "float32",
) -> AbstractDenoiser:
    """The denoiser of diffusion denoised smoothing at noise level `sigma` (image scale).

    model: a VP-SDE `ScoreModel` (or a `Purifier`, whose score model is taken; its PurifyConfig
      is not used), or a `ddpm.DDPMPurifier` (its eps network and schedule; its DDPMConfig is not
      used). Images are at the network's size (no `input_size` resizing).
    timesteps: for a ScoreModel, 'continuous' (t from `vp_time_for_sigma`), 'integer' (the
      network takes floor(N t): nearest discrete timestep, see the module docstring) or 'auto'
      (integer for `guided_diffusion_score_fn`, else continuous).
    n_reverse: 0 (default) for the one-shot x0 prediction; R > 0 for R DensePure-style reverse
      solves of `n_steps` steps with `solver` (VP-SDE ScoreModels only), majority-voted.
    score_dtype: 'float32' or 'bfloat16', the dtype the network computes in.
    """
    if isinstance(model, Purifier):
        model = model.score
    if isinstance(model, DDPMPurifier):
        if n_reverse:
            raise ValueError(
                "DensePure-style reverse runs (n_reverse > 0) take a VP-SDE ScoreModel; a DDPM "
                "eps network (DDPMPurifier) supports the one-shot denoiser only (n_reverse=0)."
            )
        abar = model.schedule.alphas_cumprod
        k = nearest_timestep(abar, sigma)
        eps_fn = with_score_dtype(model.eps_fn, score_dtype)
        shape = tuple(model.image_shape)
        return OneShotDenoiser(model.variables, eps_fn, k, float(abar[k]), shape, clip, "ddpm")
    if not isinstance(model, ScoreModel):
        raise TypeError(
            f"diffusion_denoiser takes a ScoreModel, Purifier or DDPMPurifier, got "
            f"{type(model).__name__}."
        )
    if timesteps not in ("auto", "continuous", "integer"):
        raise ValueError(f"timesteps must be 'auto', 'continuous' or 'integer', got {timesteps!r}")
    integer = timesteps == "integer" or (
        timesteps == "auto" and _uses_integer_timesteps(model.score_fn)
    )
    sde, shape = model.sde, tuple(model.image_shape)
    if n_reverse:
        t = vp_time_for_sigma(sde, sigma)
        config = PurifyConfig(
            t_star=t,
            dt=t / n_steps,
            solver=solver,
            forward_schedule="continuous",
            score_dtype=score_dtype,
        )
        return ReverseDenoiser(model, config, int(n_reverse), clip)
    eps_fn = ScoreEps(with_score_dtype(model.score_fn, score_dtype), sde)
    if integer:
        abar = discrete_vp_alphas_cumprod(sde)
        k = nearest_timestep(abar, sigma)
        level = (k + 0.5) / sde.n_discrete  # floor(N level) = k in float32
        return OneShotDenoiser(
            model.variables, eps_fn, level, float(abar[k]), shape, clip, "vp_integer"
        )
    t = vp_time_for_sigma(sde, sigma)
    abar = math.exp(-(sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t * t))
    return OneShotDenoiser(model.variables, eps_fn, t, abar, shape, clip, "vp_continuous")


# -- the smoothed classifier ---------------------------------------------------------------------


def _logits(classifier, x):
    # Noisy and denoised images leave [0, 1] by design: skip the range check.
    return classifier(x, check=False) if isinstance(classifier, Classifier) else classifier(x)


class SmoothedClassifier(eqx.Module):
    """The smoothed classifier g of a base classifier f(denoise(x + sigma eps)) (a pytree).

    classifier: a `Classifier` (or any module x -> (N, K) logits); denoiser: an
    `AbstractDenoiser` or None (plain randomized smoothing of the classifier); sigma (static):
    the smoothing noise std in image units; num_classes (static): K. Build it with
    `smoothed_classifier`."""

    classifier: Any
    denoiser: AbstractDenoiser | None
    sigma: float = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def base_labels(self, x: jax.Array, sample_keys: jax.Array) -> jax.Array:
        """(B, S) int32 base-classifier labels: x (B, H, W, C) in [0, 1], sample_keys (B, S)
        one key per noise sample (its eps from fold_in(key, 0)), in one batched call."""
        b, s = sample_keys.shape
        shape = x.shape[1:]
        flat_keys = sample_keys.reshape(-1)
        eps = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, SMOOTHING_NOISE), shape, x.dtype)
        )(flat_keys)
        x_noisy = (x[:, None] + self.sigma * eps.reshape(b, s, *shape)).reshape(-1, *shape)
        if self.denoiser is None:
            images = x_noisy[None]
        else:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, DENOISER_NOISE))(flat_keys)
            images = self.denoiser(x_noisy, keys)
        votes = images.shape[0]
        logits = _logits(self.classifier, images.reshape(-1, *shape))
        labels = jnp.argmax(logits, axis=-1).reshape(votes, b * s)
        if votes > 1:
            tally = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.int32).sum(axis=0)
            labels = jnp.argmax(tally, axis=-1)  # the majority (ties: the smaller label)
        return labels.reshape(b, s).astype(jnp.int32)

    def settings(self) -> dict:
        """The smoothed model's identity for a run's settings (sigma, K, the denoiser's)."""
        return {
            "sigma": self.sigma,
            "num_classes": self.num_classes,
            "denoiser": None if self.denoiser is None else self.denoiser.describe(),
        }

    def counts(self, x, key, index=None, n: int = 100_000, batch: int = 200, stream=0, mesh=None):
        """(B, K) NumPy int32 class counts of n noise samples (`count_samples`)."""
        return count_samples(self, x, key, index, n, batch, stream, mesh)

    def predict(
        self,
        x,
        key,
        index=None,
        n: int = 100_000,
        alpha: float = 0.001,
        batch: int = 200,
        mesh=None,
    ) -> PredictResult:
        """Cohen et al.'s PREDICT (module docstring) per example: a `PredictResult`."""
        return predict(self, x, key, index, n, alpha, batch, mesh)

    def certify(
        self,
        x,
        key,
        index=None,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch: int = 200,
        mesh=None,
    ) -> CertifyResult:
        """Cohen et al.'s CERTIFY (module docstring) per example: a `CertifyResult`."""
        return certify(self, x, key, index, n0, n, alpha, batch, mesh)


def smoothed_classifier(
    classifier,
    sigma: float,
    denoiser: AbstractDenoiser | ScoreModel | Purifier | DDPMPurifier | None = None,
    num_classes: int | None = None,
    **denoiser_options,
) -> SmoothedClassifier:
    """A `SmoothedClassifier`. `denoiser`: None (plain randomized smoothing), a denoiser, or a
    diffusion model given to `diffusion_denoiser(model, sigma, **denoiser_options)`.
    num_classes: default from the classifier's output on one image of its `image_shape`."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if denoiser is not None and not isinstance(denoiser, AbstractDenoiser):
        denoiser = diffusion_denoiser(denoiser, sigma, **denoiser_options)
    elif denoiser_options:
        raise ValueError(f"denoiser options {sorted(denoiser_options)} need a diffusion model")
    if num_classes is None:
        shape = getattr(classifier, "image_shape", None)
        if shape is None:
            raise ValueError("pass num_classes: the classifier has no image_shape")
        out = jax.eval_shape(lambda c: _logits(c, jnp.zeros((1, *shape))), classifier)
        num_classes = int(out.shape[-1])
    return SmoothedClassifier(classifier, denoiser, float(sigma), int(num_classes))


@functools.partial(jax.jit, static_argnames=("n", "batch"))
def sample_counts(smoothed: SmoothedClassifier, x, key, index, n: int, batch: int, stream=0):
    """(B, K) int32 counts of the base labels of n noise samples per example (jitted; any B).

    Sample j of example i uses the key fold_in(noise.example_keys(key, index, stream)[i], j).
    A `lax.scan` over ceil(n / c) chunks of c = min(batch, n) samples, one batched base
    classifier call of B * c images each; samples j >= n of the last chunk are not counted."""
    chunk = min(batch, n)
    n_chunks = -(-n // chunk)
    keys = noise.example_keys(key, index, stream)

    def body(counts, c):
        j = c * chunk + jnp.arange(chunk)
        sample_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(j))(keys)
        labels = smoothed.base_labels(x, sample_keys)
        hits = jax.nn.one_hot(labels, smoothed.num_classes, dtype=jnp.int32)
        return counts + jnp.sum(hits * (j < n)[None, :, None].astype(jnp.int32), axis=1), None

    counts = jnp.zeros((x.shape[0], smoothed.num_classes), jnp.int32)
    return jax.lax.scan(body, counts, jnp.arange(n_chunks))[0]


def _image_shape(smoothed: SmoothedClassifier):
    denoiser = smoothed.denoiser
    if isinstance(denoiser, OneShotDenoiser):
        return tuple(denoiser.image_shape)
    if isinstance(denoiser, ReverseDenoiser):
        return tuple(denoiser.score.image_shape)
    shape = getattr(smoothed.classifier, "image_shape", None)
    return None if shape is None else tuple(shape)


def _check_inputs(smoothed: SmoothedClassifier, x, index):
    """x as NumPy, checked on the host as `purify.check_images` checks (shape, floating dtype,
    [0, 1]: inside a multi-device program a failed check aborts), and index (default arange)."""
    x = np.asarray(x)
    index = np.arange(len(x)) if index is None else np.asarray(index)
    shape = _image_shape(smoothed)
    if x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != shape):
        want = f"(B, {', '.join(map(str, shape))})" if shape else "(B, H, W, C)"
        raise ValueError(f"images must be NHWC {want} float arrays in [0, 1]; got {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {x.dtype}.")
    if x.size and not (x.min() >= -INPUT_TOLERANCE and x.max() <= 1 + INPUT_TOLERANCE):
        raise ImageRangeError(
            f"images must be in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]; "
            "divide uint8 images by 255."
        )
    if index.shape != (len(x),):
        raise ValueError(f"index must be ({len(x)},) dataset indices, got shape {index.shape}")
    return x, index


def count_samples(smoothed, x, key, index=None, n=100_000, batch=200, stream=0, mesh=None):
    """`sample_counts` on a batch split over the devices of `mesh` (default: all local ones),
    padded as `sharding.run_sharded` does. Returns (B, K) NumPy int32 counts."""
    x, index = _check_inputs(smoothed, x, index)
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1, got {n}, {batch}")

    def fn(xb, smoothed, key, index):
        return sample_counts(smoothed, xb, key, index, n, batch, stream)

    return np.asarray(sharding.run_sharded(fn, x, smoothed, key, mesh=mesh, index=index))


def predict(smoothed, x, key, index=None, n=100_000, alpha=0.001, batch=200, mesh=None):
    """PREDICT (Cohen et al., Algorithm "PREDICT") for each image of x (B, H, W, C) in [0, 1]:
    n samples of the PREDICTION stream, the top two counts, the binomial test at alpha.
    index (B,): the dataset indices the noise follows (default arange(B))."""
    counts = count_samples(smoothed, x, key, index, n, batch, PREDICTION, mesh)
    return predict_from_counts(counts, alpha)


def certify(smoothed, x, key, index=None, n0=100, n=100_000, alpha=0.001, batch=200, mesh=None):
    """CERTIFY (Cohen et al., Algorithm "CERTIFY") for each image of x (B, H, W, C) in [0, 1]:
    n0 SELECTION samples pick c_A, n ESTIMATION samples bound pA from below; a
    `CertifyResult`. index (B,): the dataset indices the noise follows (default arange(B))."""
    selection = count_samples(smoothed, x, key, index, n0, batch, SELECTION, mesh)
    counts = count_samples(smoothed, x, key, index, n, batch, ESTIMATION, mesh)
    return certify_from_counts(selection, counts, smoothed.sigma, alpha)


# -- resumable per-example records ---------------------------------------------------------------


def certified_accuracy(records: Sequence[dict], radii: Sequence[float]) -> np.ndarray:
    """(len(radii),) fractions of the records with a correct prediction and radius >= r."""
    if not records:
        return np.zeros(len(radii))
    correct = np.array([r["correct"] for r in records], bool)
    radius = np.array([r["radius"] for r in records], np.float64)
    return np.array([float(np.mean(correct & (radius >= r))) for r in radii])


def summarize(records: Sequence[dict], radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """Certified accuracy at each radius (fractions), the abstention rate and the smoothed
    classifier's accuracy (a correct, non-abstaining prediction), from per-example records."""
    n = len(records)
    if n == 0:
        return {"n_examples": 0}
    acc = certified_accuracy(records, radii)
    return {
        "n_examples": n,
        "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, acc, strict=True)},
        "abstention_rate": float(np.mean([r["prediction"] == ABSTAIN for r in records])),
        "accuracy": float(np.mean([r["correct"] for r in records])),
    }


def noise_samples_per_second(workdir: str) -> float | None:
    """Noise samples (n0 + n per example) per wall second of counting in `workdir`, leaving out
    each sitting's first batch (compilation) when other batches were timed; None if none was."""
    timings = [t for t in read_timings(workdir) if "samples" in t]
    steady = [t for t in timings if not t["first"]] or timings
    seconds = sum(t["seconds"] for t in steady)
    return sum(t["samples"] for t in steady) / seconds if seconds else None


def markdown_table(summary: dict) -> str:
    s = summary.get("settings", {})
    lines = [f"Settings: {json.dumps(s, sort_keys=True)}", ""]
    if summary.get("n_examples"):
        lines += [
            f"Examples: {summary['n_examples']}; abstained: "
            f"{100 * summary['abstention_rate']:.2f}%; smoothed accuracy: "
            f"{100 * summary['accuracy']:.2f}%",
            "",
            "| L2 radius | certified accuracy (%) |",
            "|---|---|",
        ]
        lines += [f"| {r} | {100 * a:.2f} |" for r, a in summary["certified_accuracy"].items()]
    return "\n".join(lines) + "\n"


def write_summary(workdir: str, settings: dict, radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """summary.json and summary.md of `workdir` from its records (any radii: not a setting)."""
    records = sorted(read_records(workdir), key=lambda r: r["index"])
    summary = {"settings": settings, **summarize(records, radii)}
    with open(os.path.join(workdir, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, SUMMARY_MD), "w") as f:
        f.write(markdown_table(summary))
    return summary


def run_certification(
    smoothed: SmoothedClassifier,
    x,
    y,
    index,
    workdir: str,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch: int = 200,
    examples_per_batch: int = 16,
    seed: int = 0,
    radii: Sequence[float] = DEFAULT_RADII,
    description: dict | None = None,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """CERTIFY every example of (x, y) into `workdir`, `examples_per_batch` at a time, resuming.

    Args:
      smoothed: the smoothed classifier. x: (N, H, W, C) in [0, 1]; y: (N,) labels; index: (N,)
        dataset indices (the noise of example i follows (seed, index[i], sample)). Every process
        passes the same full arrays.
      n0, n, alpha: CERTIFY's; batch: noise samples per chunk and example (memory, not results).
      description: the caller's identity of the run (checkpoints, dataset...), merged with
        sigma, n0, n, alpha, seed and the smoothed model's `settings()`; a rerun with other
        settings refuses. `batch` and `examples_per_batch` are not settings: the records do not
        depend on them.
      after_batch: called with the batch number once its records are durable (tests: kills).
      mesh: the devices a batch of examples is split over (default: all local ones).
    Returns the summary (also in summary.json and summary.md) plus `noise_samples_per_second`
    (from timings.jsonl, not written to the summary: it differs between runs).

    Each record: index, label, prediction (-1: abstain), guess (c_A), radius, pa_lower, count_a
    (n_A), n0, n, sigma, alpha, correct (prediction == label) and batch. As in
    `runner.run_evaluation`, process p of several runs the batches b % count == p into
    records.p{p}.jsonl, merged into records.jsonl at the end.
    """
    settings = {
        **(description or {}),
        **smoothed.settings(),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "seed": int(seed),
    }
    check_run_config(workdir, settings)
    x, y = np.asarray(x), np.asarray(y)
    x, index = _check_inputs(smoothed, x, index)
    if len(y) != len(x):
        raise ValueError(f"x and y differ in length: {len(x)}, {len(y)}")
    process, n_processes = jax.process_index(), jax.process_count()
    own_records = records_path(workdir, process, n_processes)
    truncate_torn_tail(own_records)
    done = {r["index"] for r in read_records(workdir)}
    size = examples_per_batch
    batches = [(b, slice(s, min(s + size, len(x)))) for b, s in enumerate(range(0, len(x), size))]
    mine = [batches[b] for b in sharding.process_batches(len(batches), process, n_processes)]
    mesh = sharding.data_mesh() if mesh is None else mesh
    smoothed_r = sharding.replicate(smoothed, mesh)
    key = jax.random.key(seed)
    own_timings = os.path.join(
        workdir, TIMINGS if n_processes == 1 else PROCESS_TIMINGS.format(process)
    )
    desc = "certifying" if n_processes == 1 else f"certifying (process {process}/{n_processes})"
    bar = progress_bar_or_none(len(mine), progress, desc, "batch")
    all_records, first = list(read_records(workdir)), True
    for b, sl in mine:
        todo = [i for i in range(sl.start, sl.stop) if int(index[i]) not in done]
        if not todo:
            bar.update(1)
            continue
        xb, yb, ib = x[todo], y[todo], index[todo]
        started = time.perf_counter()
        selection = count_samples(smoothed_r, xb, key, ib, n0, batch, SELECTION, mesh)
        counts = count_samples(smoothed_r, xb, key, ib, n, batch, ESTIMATION, mesh)
        seconds = time.perf_counter() - started
        result = certify_from_counts(selection, counts, smoothed.sigma, alpha)
        records = [
            {
                "index": int(ib[i]),
                "label": int(yb[i]),
                "prediction": int(result.prediction[i]),
                "guess": int(result.guess[i]),
                "radius": float(result.radius[i]),
                "pa_lower": float(result.pa_lower[i]),
                "count_a": int(result.count_a[i]),
                "n0": int(n0),
                "n": int(n),
                "sigma": smoothed.sigma,
                "alpha": float(alpha),
                "correct": bool(result.prediction[i] == yb[i]),
                "batch": b,
            }
            for i in range(len(todo))
        ]
        _fsync_append(own_records, [json.dumps(r, sort_keys=True) for r in records])
        timing = dict(
            batch=b,
            examples=len(todo),
            samples=len(todo) * (n0 + n),
            seconds=seconds,
            process=process,
            first=first,
        )
        _fsync_append(own_timings, [json.dumps(timing, sort_keys=True)])
        first = False
        all_records += records
        s = summarize(all_records, (0.0,))
        bar.set_postfix_str(
            f"n={s['n_examples']} certified={100 * s['certified_accuracy']['0']:.1f}% "
            f"abstain={100 * s['abstention_rate']:.1f}%"
        )
        bar.update(1)
        if after_batch is not None:
            after_batch(b)
    bar.close()
    if n_processes == 1:
        merge_records(workdir)
        summary = write_summary(workdir, settings, radii)
    else:
        sharding.barrier("diffpure_jax.certify: all batches written")
        if process == 0:
            merge_records(workdir)
            write_summary(workdir, settings, radii)
        sharding.barrier("diffpure_jax.certify: summary written")
        with open(os.path.join(workdir, SUMMARY_JSON)) as f:
            summary = json.load(f)
    return {**summary, "noise_samples_per_second": noise_samples_per_second(workdir)}
