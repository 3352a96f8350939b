"""Purification-aware training: the resumable purified-copy job and fine-tuning on its images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import SMALL_WRN, Killed, images

from diffpure_jax import load_classifier, models
from diffpure_jax.train import ClassifierTraining, LoopConfig
from diffpure_jax.train import classifier as clf
from diffpure_jax.train.purified import load_purified, purify_dataset, with_purified


def fake_purify(calls):
    """A deterministic stand-in for a purifier: depends on the image and its dataset index."""

    def purify_batch(x, index):
        calls.append(np.asarray(index).tolist())
        return np.asarray(x) * 0.5 + np.asarray(index, np.float32)[:, None, None, None] / 100

    return purify_batch


def test_purify_dataset_resumes_after_a_kill_and_extends_a_prefix(tmp_path):
    x, _ = images(10)
    index = np.arange(100, 110)
    expected = fake_purify([])(x, index)
    straight = purify_dataset(fake_purify([]), x, index, str(tmp_path / "a"), {"s": 1}, 4, False)
    np.testing.assert_array_equal(straight, expected)

    work = str(tmp_path / "b")
    calls = []

    def dies_on_second_chunk(xb, ib):
        if len(calls) == 1:
            raise Killed
        return fake_purify(calls)(xb, ib)

    with pytest.raises(Killed):
        purify_dataset(dies_on_second_chunk, x, index, work, {"s": 1}, 4, False)
    calls.clear()
    resumed = purify_dataset(fake_purify(calls), x, index, work, {"s": 1}, 4, False)
    np.testing.assert_array_equal(resumed, straight)
    assert calls == [[104, 105, 106, 107], [108, 109]]  # the finished chunk was kept

    # A longer prefix of the same order redoes only the short last chunk and the new ones.
    x2, _ = images(13)
    index2 = np.arange(100, 113)
    calls.clear()
    longer = purify_dataset(fake_purify(calls), x2, index2, work, {"s": 1}, 4, False)
    assert calls == [[108, 109, 110, 111], [112]]
    np.testing.assert_array_equal(longer, fake_purify([])(x2, index2))
    found_index, found = load_purified(work)
    np.testing.assert_array_equal(found_index, index2)
    np.testing.assert_array_equal(found, longer)

    with pytest.raises(ValueError, match="different settings"):
        purify_dataset(fake_purify([]), x, index, work, {"s": 2}, 4, False)
    with pytest.raises(FileNotFoundError, match="purify_train_set"):
        load_purified(str(tmp_path / "empty"))


def test_with_purified_aligns_copies_by_dataset_index():
    x, _ = images(6)
    purified = np.full((2, 8, 8, 1), -1.0, np.float32)
    x_alt, has_alt = with_purified(x, np.array([4, 1]), purified)
    assert has_alt.tolist() == [False, True, False, False, True, False]
    np.testing.assert_array_equal(x_alt[[1, 4]], purified)
    np.testing.assert_array_equal(x_alt[has_alt == 0], x[has_alt == 0])


def test_use_purified_replaces_only_images_with_a_copy_with_the_given_chance():
    x = jnp.zeros((2000, 2, 2, 1))
    x_pur = jnp.ones_like(x)
    has = jnp.arange(2000) % 2 == 0
    always = np.asarray(clf.use_purified(x, x_pur, has, jax.random.key(0), 1.0))[:, 0, 0, 0]
    np.testing.assert_array_equal(always, np.asarray(has, np.float32))
    half = np.asarray(clf.use_purified(x, x_pur, has, jax.random.key(0), 0.5))[:, 0, 0, 0]
    assert np.all(half[~np.asarray(has)] == 0)
    assert 400 < half[np.asarray(has)].sum() < 600


def test_fine_tuning_on_purified_copies_starts_from_the_given_classifier(tmp_path):
    x, y = images(32)
    x_pur = np.clip(x + 0.1, 0, 1)
    purified = with_purified(x, np.arange(16), x_pur[:16])
    module = models.build_model("wideresnet", SMALL_WRN)
    start = module.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)))
    cfg = ClassifierTraining(lr=0.05, warmup_steps=1, purified_prob=1.0)
    state = clf.init_state(module, cfg, (8, 8, 1), 0, 10, {**start})
    jax.tree.map(np.testing.assert_array_equal, state["params"], start["params"])

    step = clf.make_step(module, cfg, n_steps=10)
    batch = (x, y, *purified)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, jax.random.key(2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]

    loop = LoopConfig(n_steps=2, batch_size=8, seed=0, save_every=1)
    config, variables = clf.train_classifier(
        x,
        y,
        str(tmp_path / "c"),
        str(tmp_path / "w"),
        "wideresnet",
        SMALL_WRN,
        loop,
        cfg,
        False,
        purified=purified,
        init_variables=start,
        provenance={"init_from": "start"},
    )
    assert config["training"]["provenance"] == {"init_from": "start"}
    assert load_classifier(str(tmp_path / "c"))(jnp.asarray(x[:2])).shape == (2, 10)
    with pytest.raises(ValueError, match="purified copies"):
        clf.train_classifier(
            x, y, None, str(tmp_path / "w2"), "wideresnet", SMALL_WRN, loop, cfg, False
        )
