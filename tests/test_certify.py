"""Certified robustness (`diffpure_jax.certify`): Cohen et al.'s PREDICT / CERTIFY with their
statistics, the diffusion denoisers of denoised smoothing, and the resumable records."""

import json
import math
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHAPE, Killed, gaussian_score, kill_at, synthetic_data, trained_mlp
from scipy import stats

from diffpure_jax import VPSDE, ScoreModel, noise
from diffpure_jax import certify as C
from diffpure_jax.classifier import Classifier
from diffpure_jax.ddpm import DDPMConfig, DDPMPurifier, DDPMSchedule
from diffpure_jax.purify import make_path
from diffpure_jax.score import guided_diffusion_score_fn

# -- statistics -----------------------------------------------------------------------------------


def _exact_cp_lower(k: int, n: int, alpha: Fraction, iters: int = 60) -> float:
    """Clopper-Pearson by exact rational arithmetic: bisection on P(Bin(n, p) >= k) = alpha."""

    def tail(p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    lo, hi = Fraction(0), Fraction(1)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    return float(lo)


def test_clopper_pearson_lower_bound():
    for n in (1, 2, 10, 100, 1000, 10_000, 100_000):
        for k in sorted({1, n // 3, n // 2, n - 1, int(0.9 * n), int(0.99 * n), n}):
            if not 1 <= k <= n:
                continue
            for alpha in (0.001, 0.05):
                ref = stats.beta.ppf(alpha, k, n - k + 1)
                np.testing.assert_allclose(C.clopper_pearson_lower(k, n, alpha), ref, rtol=1e-9)
    # Edge cases: k = 0 gives 0, k = n the closed form alpha^(1/n).
    assert C.clopper_pearson_lower(0, 100, 0.001) == 0.0
    for n in (1, 7, 100_000):
        np.testing.assert_allclose(C.clopper_pearson_lower(n, n, 0.001), 0.001 ** (1 / n))
    # An independent computation in exact arithmetic.
    for k, n in ((1, 30), (17, 30), (29, 30), (45, 60)):
        exact = _exact_cp_lower(k, n, Fraction(1, 1000))
        np.testing.assert_allclose(C.clopper_pearson_lower(k, n, 0.001), exact, rtol=1e-12)
    with pytest.raises(ValueError):
        C.clopper_pearson_lower(5, 4)


def test_binomial_test_and_normal_quantile():
    for n in (1, 5, 20, 101, 1000, 100_000):
        for k in range(0, n + 1, max(1, n // 9)):
            ref = stats.binomtest(k, n, 0.5).pvalue
            np.testing.assert_allclose(C.binomial_test_pvalue(k, n), ref, rtol=1e-9, atol=1e-300)
    assert C.binomial_test_pvalue(50, 100) == 1.0
    for p in (1e-6, 0.001, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9):
        np.testing.assert_allclose(C.normal_ppf(p), stats.norm.ppf(p), rtol=1e-12, atol=1e-14)


def test_no_certificate_unless_pa_lower_above_half():
    n = 400
    counts = np.array([[k, n - k] for k in range(n + 1)])
    result = C.certify_from_counts(np.tile([[1, 0]], (n + 1, 1)), counts, sigma=0.5)
    certified = result.pa_lower > 0.5
    assert certified.any() and not certified.all()
    assert np.all(result.prediction[~certified] == C.ABSTAIN)
    assert np.all(result.radius[~certified] == 0.0)
    assert np.all(result.radius[certified] > 0.0)
    assert np.all(result.prediction[certified] == 0)
    assert np.all(counts[certified, 0] > n / 2)  # the bound is below the point estimate
    # pA = 1/2 exactly (half the counts): never certified.
    assert C.certify_from_counts([[3, 1]], [[n // 2, n // 2]], 0.5).prediction[0] == C.ABSTAIN
    # PREDICT abstains on a tie of the top two, and answers on a clear winner.
    tie = C.predict_from_counts([[40, 3, 40], [0, 90, 10]], alpha=0.001)
    np.testing.assert_array_equal(tie.prediction, [C.ABSTAIN, 1])
    assert tie.pvalue[0] == 1.0


# -- randomized smoothing of a linear classifier -------------------------------------------------

LINEAR_SHAPE = (4, 4, 1)


def _linear_apply(v, x):
    s = x.reshape(x.shape[0], -1) @ v["w"] + v["b"]
    return jnp.stack([-s, s], axis=-1)  # class 1 iff w.x + b > 0


def _linear_problem(margins):
    """A binary linear classifier and images at signed L2 distances `margins` from its boundary."""
    d = int(np.prod(LINEAR_SHAPE))
    w = np.asarray(jax.random.normal(jax.random.key(0), (d,)), np.float64)
    unit = w / np.linalg.norm(w)
    x0 = np.full(d, 0.5)
    x = x0[None] + np.asarray(margins)[:, None] * unit[None]
    assert 0 <= x.min() and x.max() <= 1
    v = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(-w @ x0, jnp.float32)}
    classifier = Classifier(v, _linear_apply, LINEAR_SHAPE)
    xs = x.reshape(-1, *LINEAR_SHAPE).astype(np.float32)
    s = xs.reshape(len(xs), -1).astype(np.float64) @ w - w @ x0  # the float32 images' margins
    return classifier, xs, np.abs(s) / np.linalg.norm(w), (s > 0).astype(int)


def test_linear_classifier_radius_matches_closed_form():
    sigma = 0.25
    margins = np.array([0.08, 0.18, 0.3, -0.35, 0.45, -0.12])
    classifier, x, exact_radius, side = _linear_problem(margins)
    smoothed = C.smoothed_classifier(classifier, sigma)
    assert smoothed.num_classes == 2 and smoothed.denoiser is None
    pa = np.array([C.normal_cdf(r / sigma) for r in exact_radius])
    gaps = {}
    for n in (1000, 10_000, 100_000):
        result = smoothed.certify(x, jax.random.key(1), np.arange(len(x)), n=n, batch=5000)
        assert np.all((result.prediction == side) | (result.prediction == C.ABSTAIN))
        np.testing.assert_array_equal(result.guess, side)
        assert np.all(result.radius <= exact_radius)  # a certificate never overclaims
        sd = np.sqrt(n * pa * (1 - pa))
        assert np.all(np.abs(result.count_a - n * pa) <= 4 * sd + 1)
        if n == 10_000:
            # The radius of the exact pA's count, within a few binomial standard deviations.
            def radius_at(count, n=n):
                lower = C.clopper_pearson_lower(int(np.clip(round(count), 0, n)), n, 0.001)
                return sigma * C.normal_ppf(lower) if lower > 0.5 else 0.0

            for i in range(len(x)):
                lo, hi = radius_at(n * pa[i] - 4 * sd[i]), radius_at(n * pa[i] + 4 * sd[i])
                assert lo - 1e-12 <= result.radius[i] <= hi + 1e-12, (i, lo, result.radius, hi)
        gaps[n] = float(np.mean(exact_radius - result.radius))
    assert gaps[100_000] < gaps[10_000] < gaps[1000]
    assert gaps[100_000] < 0.015
    # On the boundary pA = 1/2: CERTIFY abstains.
    boundary = _linear_problem(np.array([0.0]))[1]
    assert smoothed.certify(boundary, jax.random.key(2), n=2000).prediction[0] == C.ABSTAIN
    # PREDICT answers far from the boundary and abstains on it.
    far = smoothed.predict(x[[4]], jax.random.key(3), n=1000)
    assert far.prediction[0] == side[4]
    assert smoothed.predict(boundary, jax.random.key(3), n=1000).prediction[0] == C.ABSTAIN


# -- batching --------------------------------------------------------------------------------------


def _mlp_classifier():
    return Classifier(trained_mlp(), lambda m, x: m(x), SHAPE)


def _denoiser_model():
    return gaussian_score(SHAPE)


@pytest.mark.parametrize("denoised", [False, True])
def test_counts_do_not_depend_on_batching(denoised):
    x = np.asarray(synthetic_data(4, seed=3)[0])
    index = np.array([3, 17, 42, 5])
    denoiser = _denoiser_model() if denoised else None
    smoothed = C.smoothed_classifier(_mlp_classifier(), 0.5, denoiser)
    key, n = jax.random.key(4), 300
    full = smoothed.counts(x, key, index, n=n, batch=64)
    assert full.dtype == np.int32 and full.shape == (4, 10)
    np.testing.assert_array_equal(full.sum(axis=1), n)
    assert (full > 0).sum(axis=1).max() > 1  # the noise changes some labels
    np.testing.assert_array_equal(smoothed.counts(x, key, index, n=n, batch=7), full)
    np.testing.assert_array_equal(smoothed.counts(x, key, index, n=n, batch=n), full)
    # Other examples in the batch, or none: the same rows.
    np.testing.assert_array_equal(
        smoothed.counts(x[1:3], key, index[1:3], n=n, batch=64), full[1:3]
    )
    np.testing.assert_array_equal(smoothed.counts(x[[2]], key, index[[2]], n=n, batch=9), full[[2]])
    # Another stream (selection vs estimation), another key: other samples.
    assert not np.array_equal(smoothed.counts(x, key, index, n=n, batch=64, stream=1), full)


def test_counting_is_one_scan_of_batched_calls():
    """The base classifier is traced once for all chunks (a scan), on B * batch images."""
    sizes = []

    def apply(m, x):
        sizes.append(x.shape[0])
        return m(x)

    smoothed = C.smoothed_classifier(Classifier(trained_mlp(), apply, SHAPE), 0.5, num_classes=10)
    x = np.asarray(synthetic_data(3, seed=3)[0])
    C.sample_counts(smoothed, x, jax.random.key(0), jnp.arange(3), n=1000, batch=100)
    assert sizes == [300]


# -- denoisers -------------------------------------------------------------------------------------


def test_sigma_to_vp_time():
    sde = VPSDE()
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = C.vp_time_for_sigma(sde, sigma)
        abar = math.exp(sde.log_alpha_bar(t))
        np.testing.assert_allclose((1 - abar) / abar, (2 * sigma) ** 2, rtol=1e-6)
        denoiser = C.diffusion_denoiser(gaussian_score(), sigma)
        assert denoiser.kind == "vp_continuous" and denoiser.level == t
        np.testing.assert_allclose(denoiser.alpha_bar, 1 / (1 + 4 * sigma**2), rtol=1e-12)


def test_one_shot_denoiser_is_tweedie_for_gaussian_data():
    """For data N(mu, s2) (model scale) the score is exact, and x0 = E[x_0 | x_t]."""
    score = gaussian_score()
    score = ScoreModel(
        {**score.variables, "c": jnp.asarray(0.0)}, score.score_fn, score.sde, (4, 4, 3)
    )
    sigma, mu, s2 = 0.25, 0.1, 0.3
    denoiser = C.diffusion_denoiser(score, sigma, clip=False)
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3))
    ab = 1 / (1 + 4 * sigma**2)
    x_t = math.sqrt(ab) * (2 * x - 1)
    posterior_mean = mu + s2 * math.sqrt(ab) / (ab * s2 + 1 - ab) * (x_t - math.sqrt(ab) * mu)
    out = denoiser(x)
    assert out.shape == (1, *x.shape)
    np.testing.assert_allclose(out[0], (posterior_mean + 1) / 2, rtol=1e-5, atol=1e-6)
    clipped = C.diffusion_denoiser(score, 2.0)(x)  # far noisier: pulled to mu, still in range
    assert 0 <= float(clipped.min()) and float(clipped.max()) <= 1


def _tiny_ddpm():
    def eps_fn(v, x, t):
        return v["a"] * jnp.tanh(x) + v["b"] * (t[:, None, None, None] / 1000.0)

    variables = {"a": jnp.asarray(0.3), "b": jnp.asarray(0.2)}
    return DDPMPurifier(
        variables, eps_fn, DDPMSchedule(num_timesteps=20), (4, 4, 3), DDPMConfig(0.25)
    )


def _x0_by_hand(x, abar, eps_of):
    x_t = np.sqrt(abar) * (2 * np.asarray(x, np.float64) - 1)
    eps = np.asarray(eps_of(jnp.asarray(x_t, jnp.float32)), np.float64)
    return np.clip((x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar), -1, 1) / 2 + 0.5


def test_ddpm_denoiser_takes_the_nearest_timestep():
    p = _tiny_ddpm()
    abar = p.schedule.alphas_cumprod
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
    for sigma in (0.05, 0.1, 0.2):
        denoiser = C.diffusion_denoiser(p, sigma)
        k = int(np.argmin(np.abs(abar.astype(np.float64) - 1 / (1 + 4 * sigma**2))))
        assert denoiser.kind == "ddpm" and denoiser.level == k
        assert denoiser.alpha_bar == float(abar[k])  # that abar, exactly
        ref = _x0_by_hand(
            x, float(abar[k]), lambda y, k=k: p.eps_fn(p.variables, y, jnp.full(2, k))
        )
        np.testing.assert_allclose(denoiser(x)[0], ref, rtol=1e-5, atol=1e-6)
    assert len({C.diffusion_denoiser(p, s).level for s in (0.05, 0.1, 0.2)}) == 3
    with pytest.raises(ValueError, match="VP-SDE ScoreModel"):
        C.diffusion_denoiser(p, 0.25, n_reverse=2)


def test_guided_diffusion_denoiser_uses_integer_timesteps():
    seen = []

    def apply_fn(v, x, timesteps):
        seen.append(timesteps)
        eps = v * jnp.tanh(x) + timesteps[:, None, None, None].astype(x.dtype) / 1000.0
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)  # eps, then the variances

    sde = VPSDE()
    score = ScoreModel(jnp.asarray(0.4), guided_diffusion_score_fn(apply_fn, sde), sde, (4, 4, 3))
    sigma = 0.25
    denoiser = C.diffusion_denoiser(score, sigma)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    k = int(np.argmin(np.abs(abar - 0.8)))
    assert denoiser.kind == "vp_integer"
    np.testing.assert_allclose(denoiser.alpha_bar, abar[k], rtol=1e-12)
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
    out = denoiser(x)[0]
    np.testing.assert_array_equal(np.asarray(seen[-1]), [k, k])
    ref = _x0_by_hand(x, abar[k], lambda y: apply_fn(0.4, y, jnp.full(2, k))[..., :3])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert C.diffusion_denoiser(score, sigma, timesteps="continuous").kind == "vp_continuous"


def test_reverse_denoiser_runs_the_reverse_sde_from_x_t():
    """DensePure-style: run r is an Euler-Maruyama solve from x_t with keys fold_in(key, r)."""
    score = gaussian_score(SHAPE)
    sigma = 0.25
    denoiser = C.diffusion_denoiser(score, sigma, n_reverse=3, n_steps=3, clip=False)
    assert denoiser.n_votes == 3
    config = denoiser.config
    t = C.vp_time_for_sigma(score.sde, sigma)
    assert config.t_star == t and config.n_steps == 3
    x = np.asarray(synthetic_data(2, seed=5)[0])
    keys = noise.example_keys(jax.random.key(1), jnp.arange(2))
    out = denoiser(x, keys)
    assert out.shape == (3, *x.shape)
    ts = jnp.asarray(config.time_grid())
    for r in (0, 2):
        path = make_path(
            config, jax.vmap(lambda k, r=r: jax.random.fold_in(k, r))(keys), SHAPE, ts=ts
        )
        y = math.sqrt(1 / (1 + 4 * sigma**2)) * (2 * x - 1)
        for i in range(config.n_steps):
            t0, t1 = ts[i], ts[i + 1]
            drift = score.sde.reverse_drift(score.score_fn(score.variables, y, t0), y, t0)
            y = y + drift * (t1 - t0) + score.sde.diffusion(t0) * path.evaluate(t0, t1)
        np.testing.assert_allclose(out[r], (y + 1) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], out[1])
    # In the smoothed classifier: one majority vote per noise sample, batching-invariant.
    smoothed = C.smoothed_classifier(_mlp_classifier(), sigma, denoiser)
    counts = smoothed.counts(x, jax.random.key(2), np.array([4, 9]), n=12, batch=12)
    np.testing.assert_array_equal(counts.sum(axis=1), 12)
    again = smoothed.counts(x[1:], jax.random.key(2), np.array([9]), n=12, batch=5)
    np.testing.assert_array_equal(again, counts[1:])


# -- records ---------------------------------------------------------------------------------------


def _run(workdir, **kw):
    classifier, x, _, side = _linear_problem(np.array([0.3, -0.05, 0.5, 0.0, -0.4]))
    y = np.array([side[0], side[1], 1 - side[2], side[3], side[4]])  # example 2 mislabelled
    smoothed = C.smoothed_classifier(classifier, 0.25)
    options = dict(n0=20, n=500, batch=64, examples_per_batch=2, progress=False)
    options.update(kw)
    index = np.arange(5) + 100
    return C.run_certification(smoothed, x, y, index, str(workdir), **options)


def _records(workdir):
    with open(os.path.join(workdir, "records.jsonl")) as f:
        return sorted((json.loads(line) for line in f), key=lambda r: r["index"])


def test_certification_records_resume(tmp_path):
    whole = _run(tmp_path / "whole")
    assert whole["n_examples"] == 5
    with pytest.raises(Killed):
        _run(tmp_path / "resumed", after_batch=kill_at(0))
    assert len(_records(tmp_path / "resumed")) == 2
    with open(tmp_path / "resumed" / "records.jsonl", "a") as f:
        f.write('{"index": 104, "lab')  # a torn line from a kill mid-write
    # Neither the noise chunk nor the examples per batch change a record (but its batch number).
    resumed = _run(tmp_path / "resumed", examples_per_batch=3, batch=17)

    def without_batch(records):
        return [{k: v for k, v in r.items() if k != "batch"} for r in records]

    assert without_batch(_records(tmp_path / "resumed")) == without_batch(
        _records(tmp_path / "whole")
    )
    drop = ("noise_samples_per_second",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in whole.items() if k not in drop
    }
    records = _records(tmp_path / "whole")
    assert [r["index"] for r in records] == [100, 101, 102, 103, 104]
    r = records[0]
    assert set(r) >= {"label", "prediction", "radius", "pa_lower", "count_a", "n0", "n", "sigma"}
    assert r["correct"] and r["radius"] > 0 and r["n"] == 500 and r["sigma"] == 0.25
    assert records[2]["prediction"] == records[2]["guess"] and not records[2]["correct"]
    assert records[3]["prediction"] == C.ABSTAIN and records[3]["radius"] == 0.0
    acc = whole["certified_accuracy"]
    assert list(acc) == ["0", "0.25", "0.5", "0.75", "1", "1.25", "1.5"]
    assert acc["0"] == np.mean([x["correct"] for x in records]) and acc["1.5"] == 0.0
    assert list(acc.values()) == sorted(acc.values(), reverse=True)
    assert whole["abstention_rate"] == np.mean([x["prediction"] == -1 for x in records])
    assert whole["noise_samples_per_second"] > 0
    with open(tmp_path / "whole" / "timings.jsonl") as f:
        timings = [json.loads(line) for line in f]
    assert sum(t["samples"] for t in timings) == 5 * 520
    assert (tmp_path / "whole" / "summary.md").read_text().count("| 0.25 |") == 1
    with pytest.raises(ValueError, match="different settings"):
        _run(tmp_path / "whole", n=600)
    with pytest.raises(ValueError, match="different settings"):
        _run(tmp_path / "whole", description={"checkpoint": "other"})
