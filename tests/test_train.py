"""The trainers: one step lowers the loss on a fixed batch; a killed run resumes to the same
result as an uninterrupted one; exported checkpoints load as models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Killed, kill_at, square_images

from diffpure_jax import load_classifier, load_purifier, models
from diffpure_jax.models.ncsnpp import tiny_ncsnpp_kwargs
from diffpure_jax.sde import VPSDE
from diffpure_jax.train import ClassifierTraining, LoopConfig, batch_indices
from diffpure_jax.train import classifier as clf
from diffpure_jax.train import score as sc

SMALL_NCSNPP = tiny_ncsnpp_kwargs(8, num_channels=1, init_scale=0.0)
SMALL_WRN = {"depth": 10, "widen_factor": 1, "num_classes": 10}
images = square_images


@pytest.mark.slow
def test_score_step_lowers_the_loss_on_a_fixed_batch():
    module = models.build_model("ncsnpp", SMALL_NCSNPP)
    cfg = sc.ScoreTraining(lr=2e-3, warmup_steps=1)
    state = sc.init_state(module, cfg, (8, 8, 1), seed=0)
    step = sc.make_step(module, cfg, VPSDE())
    x, _ = images(16)
    key = jax.random.key(1)  # the same t and noise every step: a fixed objective

    def loss(s):
        return float(sc.dsm_loss(module.apply, s["params"], x, key, VPSDE(), cfg))

    losses = [loss(state)]
    for _ in range(3):
        state, metrics = step(state, (x,), key)
        losses.append(loss(state))
    assert losses[1] < losses[0]  # one step lowers it
    assert losses[3] < losses[2] < losses[1]
    assert int(state["step"]) == 3
    ema_moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.abs(a - b).max(), state["ema"], state["params"])
    )
    assert max(float(v) for v in ema_moved) > 0  # the EMA lags the weights


def test_small_t_sampling_mixture():
    cfg = sc.ScoreTraining(small_t_fraction=0.5, small_t_max=0.3)
    t = np.asarray(sc.sample_t(jax.random.key(0), 100_000, cfg))
    assert t.min() >= cfg.t_eps and t.max() <= 1.0
    assert abs((t <= 0.3).mean() - 0.65) < 0.01  # 0.5 + 0.5 * 0.3


@pytest.mark.parametrize(
    "eps,noise,diffuse", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.0, 0.16, 0.0), (0.0, 0.0, 0.1)]
)
def test_classifier_step_lowers_the_loss_on_a_fixed_batch(eps, noise, diffuse):
    module = models.build_model("wideresnet", SMALL_WRN)
    cfg = ClassifierTraining(
        lr=0.05,
        warmup_steps=1,
        adversarial_eps=eps,
        pgd_steps=2,
        noise_std=noise,
        diffuse_t_star=diffuse,
    )
    state = clf.init_state(module, cfg, (8, 8, 1), seed=0, n_steps=100)
    step = clf.make_step(module, cfg, n_steps=100)
    x, y = images(32)
    key = jax.random.key(2)
    losses = []
    for _ in range(4):
        state, metrics = step(state, (x, y), key)
        losses.append(float(metrics["loss"]))  # the loss before each step's update
    assert losses[1] < losses[0]  # one step lowers it
    assert losses[-1] < losses[0]


def test_noise_augmentation_touches_half_the_batch_with_the_given_std():
    x = jnp.full((400, 8, 8, 1), 0.5)
    out = np.asarray(clf.add_noise(x, jax.random.key(0), 0.16))
    changed = np.any(out != 0.5, axis=(1, 2, 3))
    assert 150 < changed.sum() < 250  # each example with probability 1/2
    assert np.std(out[changed] - 0.5) == pytest.approx(0.16, rel=0.05)
    np.testing.assert_array_equal(out[~changed], 0.5)


def test_diffused_training_images_are_the_vp_sde_marginal_at_t_star():
    x = jnp.concatenate([jnp.zeros((2000, 4, 4, 1)), jnp.ones((2000, 4, 4, 1))])
    out = np.asarray(clf.diffuse_images(x, jax.random.normal(jax.random.key(0), x.shape), 0.1))
    signal, noise = VPSDE().forward_coefficients(0.1)
    assert 0.9 < signal < 0.95 and 0.3 < noise < 0.35  # alpha_bar(0.1) is about 0.9
    for value, part in ((0.0, out[:2000]), (1.0, out[2000:])):  # in [0, 1] units
        assert np.mean(part) == pytest.approx((signal * (2 * value - 1) + 1) / 2, abs=3e-3)
        assert np.std(part) == pytest.approx(noise / 2, rel=0.02)


def test_pgd_training_examples_stay_in_the_ball_and_raise_the_loss():
    from diffpure_jax.attacks.base import Threat

    w = jax.random.normal(jax.random.key(0), (16, 3))

    def loss(xa, ya):
        logp = jax.nn.log_softmax(xa.reshape(len(xa), -1) @ w)
        return jnp.mean(-logp[jnp.arange(len(ya)), ya])

    x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
    y = jnp.arange(8) % 3
    threat = Threat("Linf", 0.1)
    x_adv = clf.pgd_examples(loss, x, y, jax.random.key(2), threat, 10, 0.025)
    assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    assert float(loss(x_adv, y)) > float(loss(x, y))


def test_batches_are_seeded_epoch_permutations():
    a = [batch_indices(10, 3, seed=0, step=s) for s in range(3)]
    assert len(set(np.concatenate(a).tolist())) == 9  # one epoch: distinct examples
    np.testing.assert_array_equal(a[1], batch_indices(10, 3, seed=0, step=1))
    assert not np.array_equal(batch_indices(10, 3, 0, 3), a[0])  # next epoch, new permutation


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    x, y = images(48)
    loop = LoopConfig(n_steps=6, batch_size=8, seed=3, save_every=2, log_every=1)
    cfg = ClassifierTraining(warmup_steps=2)

    def run(out, work, after_step=None):
        return clf.train_classifier(
            x, y, out, work, "wideresnet", SMALL_WRN, loop, cfg, False, after_step
        )

    _, straight = run(str(tmp_path / "a"), str(tmp_path / "wa"))

    with pytest.raises(Killed):
        run(None, str(tmp_path / "wb"), kill_at(3))
    _, resumed = run(str(tmp_path / "b"), str(tmp_path / "wb"))
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    log = [json.loads(line) for line in (tmp_path / "wb" / "log.jsonl").open()]
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]  # the lost step 3 logged once

    other = LoopConfig(n_steps=6, batch_size=8, seed=4, save_every=2)
    with pytest.raises(ValueError, match="different settings"):
        clf.train_classifier(
            x, y, None, str(tmp_path / "wb"), "wideresnet", SMALL_WRN, other, cfg, False
        )

    model = load_classifier(str(tmp_path / "b"))
    assert model(jnp.asarray(x[:2])).shape == (2, 10)


@pytest.mark.slow
def test_score_training_exports_a_purifier_and_can_be_extended(tmp_path):
    x, _ = images(32)
    loop = LoopConfig(n_steps=2, batch_size=8, seed=0, save_every=1)
    sc.train_score(x, None, str(tmp_path / "w"), SMALL_NCSNPP, loop, progress=False)
    longer = LoopConfig(n_steps=3, batch_size=8, seed=0, save_every=1)
    config = sc.train_score(
        x, str(tmp_path / "s"), str(tmp_path / "w"), SMALL_NCSNPP, longer, progress=False
    )
    assert config["training"]["n_steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").open()]
    assert [line["step"] for line in log] == [2, 3]
    purifier = load_purifier(str(tmp_path / "s"), t_star=0.05, dt=0.01)
    out = purifier(jnp.asarray(x[:2]), jax.random.key(0))
    assert out.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
