"""`PurifyConfig(score_dtype="bfloat16")`: the score network in bfloat16, the SDE in float32.

Measured (CPU, jax 0.10.2, reference small NCSN++ with its random EMA weights, 128 uniform-noise
images, t* = 0.01, dt = 1e-3: 10 Euler steps, same key):
* purified images, bfloat16 vs float32: max abs difference 1.5e-3, mean 1.6e-4 (images in [0, 1];
  purification itself moves pixels by up to 0.20). At t* = 0.1 (100 steps, 16 images): max 6.6e-3,
  mean 1.0e-3.
* the reference small WRN-16-2 (random weights) on the purified batch: its raw predictions are
  degenerate (all 128 images get class 3, margins >= 3.2), so their 100% agreement proves little.
  With a fixed per-class bias (minus the float32 batch-mean logits, the same for both runs) the
  predictions spread over all 10 classes with margins down to 3e-3, and still agree on 128/128;
  the largest logit difference is 1.7e-3.
* speed: not faster on CPU (5.1 s float32 vs 6.3 s bfloat16 for this batch; XLA:CPU has no fast
  bfloat16 matmul/conv path here). bfloat16 is for accelerators.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpure_jax import PurifyConfig, load_classifier, purify
from diffpure_jax.convert.classifiers import convert_classifier
from diffpure_jax.score import LowPrecisionScoreFn, with_score_dtype

CFG = PurifyConfig(t_star=0.01, dt=1e-3)  # 10 steps
BATCH = 128
# bfloat16 keeps 8 significant bits (relative precision 2^-8 = 3.9e-3). Over 10 steps the
# network's correction moves pixels by up to 0.2, so a few bf16 ulps of that move is ~2e-3; the
# measured max is 1.5e-3. The bound leaves 3x headroom; a network still run in float32 would give
# ~1e-7 (checked below not to be the case), one gone wrong in bf16 (e.g. the noise labels rounded
# to bf16) gives > 1e-2.
MAX_ABS_BOUND = 5e-3
MEAN_ABS_BOUND = 5e-4  # measured 1.6e-4


@pytest.fixture(scope="module")
def small_classifier(reference_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clf") / "wrn16-2")
    convert_classifier(
        str(reference_dir / "wrn28_10_cifar10_standard_small.pth"),
        out,
        "robustbench-wrn",
        depth=16,
        widen_factor=2,
    )
    return load_classifier(out)


@pytest.fixture(scope="module")
def purified(small_score):
    x = jax.random.uniform(jax.random.key(0), (BATCH, 32, 32, 3))
    key = jax.random.key(1)
    run = jax.jit(lambda s, x, k, cfg: purify(s, cfg, x, k), static_argnums=3)
    out = {
        dtype: run(
            small_score, x, key, PurifyConfig(t_star=CFG.t_star, dt=CFG.dt, score_dtype=dtype)
        )
        for dtype in ("float32", "bfloat16")
    }
    return x, out


def _conv_dtypes(jaxpr) -> list[str]:
    """The output dtype of every convolution in a (nested) jaxpr's text."""
    return re.findall(r":(\w+)\[[\d,]*\] = conv_general_dilated", str(jaxpr))


def test_config_validates_dtype():
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        PurifyConfig(score_dtype="float16")
    assert PurifyConfig().score_dtype == "float32"


def test_network_runs_in_bfloat16_and_the_rest_in_float32(small_score):
    x = jnp.zeros((2, 32, 32, 3))
    t = jnp.full((2,), 0.05)
    low = with_score_dtype(small_score.score_fn, "bfloat16")
    assert with_score_dtype(small_score.score_fn, "float32") is small_score.score_fn
    assert isinstance(low, LowPrecisionScoreFn) and hash(low) == hash(
        with_score_dtype(small_score.score_fn, "bfloat16")
    )  # a stable static argument: no recompilation per call
    jaxpr = jax.make_jaxpr(lambda v, x: low(v, x, t))(small_score.variables, x)
    convs = _conv_dtypes(jaxpr)
    # Every convolution in bf16 (not only the first: the float32 time embedding would otherwise
    # promote the activations back to float32), and the score comes back in float32.
    assert convs and set(convs) == {"bf16"}, convs
    assert jaxpr.out_avals[0].dtype == jnp.float32
    full = jax.make_jaxpr(lambda v, x: small_score.score_fn(v, x, t))(small_score.variables, x)
    assert set(_conv_dtypes(full)) == {"f32"}
    # Inside the whole solve as well.
    cfg = PurifyConfig(t_star=0.002, dt=1e-3, score_dtype="bfloat16")
    solve = jax.make_jaxpr(lambda s, x: purify(s, cfg, x, jax.random.key(0)))(small_score, x + 0.5)
    assert set(_conv_dtypes(solve)) == {"bf16"}
    assert solve.out_avals[0].dtype == jnp.float32


@pytest.mark.slow
def test_bfloat16_purification_close_to_float32(purified):
    x, out = purified
    assert out["bfloat16"].dtype == jnp.float32
    diff = np.abs(np.asarray(out["bfloat16"]) - np.asarray(out["float32"]))
    print(f"bf16 vs f32 purified: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < MAX_ABS_BOUND and diff.mean() < MEAN_ABS_BOUND
    assert diff.max() > 1e-5  # bf16 really was used


def test_classifier_predictions_agree(purified, small_classifier):
    _, out = purified
    logits = jax.jit(lambda c, x: c(x, check=False))
    l32 = np.asarray(logits(small_classifier, out["float32"]))
    l16 = np.asarray(logits(small_classifier, out["bfloat16"]))
    # The bar: >= 99% of the batch gets the same prediction.
    assert np.mean(l32.argmax(-1) == l16.argmax(-1)) >= 0.99
    # The random classifier's raw predictions are nearly constant (large margins), which makes the
    # check above easy. Recentre its logits with one fixed per-class bias (the float32 batch mean,
    # applied to both runs): predictions then spread over the classes with small margins.
    bias = l32.mean(0)
    p32, p16 = (l32 - bias).argmax(-1), (l16 - bias).argmax(-1)
    assert len(np.unique(p32)) >= 5
    agree = np.mean(p32 == p16)
    print(f"recentred predictions agree on {agree:.1%}; classes {np.bincount(p32, minlength=10)}")
    assert agree >= 0.99
    # Margin-aware: any disagreement is an example whose float32 margin is within the logit error.
    top2 = np.sort(l32 - bias, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    err = np.abs(l32 - l16).max(-1)
    assert np.all(margin[p32 != p16] <= 2 * err[p32 != p16])


@pytest.mark.slow
@pytest.mark.parametrize("grad", ["exact", "adjoint"])
def test_gradients_in_bfloat16(small_score, grad):
    x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
    w = jax.random.normal(jax.random.key(3), x.shape)

    def g(dtype):
        cfg = PurifyConfig(t_star=0.01, dt=1e-3, grad=grad, score_dtype=dtype)
        loss = lambda x, s: jnp.sum(w * purify(s, cfg, x, jax.random.key(4)))  # noqa: E731
        return np.asarray(jax.jit(jax.grad(loss))(x, small_score)).ravel()

    g32, g16 = g("float32"), g("bfloat16")
    cosine = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
    rel = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    print(f"{grad}: bf16 vs f32 gradient cosine {cosine:.5f}, rel. L2 {rel:.2e}")
    assert np.all(np.isfinite(g16)) and cosine > 0.999 and rel < 0.02  # measured 4e-3 at most
