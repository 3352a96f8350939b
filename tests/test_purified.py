"""The purified-image cache (diffpure_jax.purified): resumable chunks, a resumed run equal to an
uninterrupted one, refusal under other settings; purify_subset's draws are the purifier's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Killed, square_images

from diffpure_jax import VPSDE, Purifier, PurifyConfig, ScoreModel
from diffpure_jax.purified import load_purified, purify_dataset, purify_subset


def images(n):
    return square_images(n)[0]


def fake_purify(calls):
    """A deterministic stand-in for a purifier: depends on the image and its dataset index."""

    def purify_batch(x, index):
        calls.append(np.asarray(index).tolist())
        return np.asarray(x) * 0.5 + np.asarray(index, np.float32)[:, None, None, None] / 100

    return purify_batch


def test_purify_dataset_resumes_after_a_kill_and_extends_a_prefix(tmp_path):
    x = images(10)
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
    x2 = images(13)
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
    with pytest.raises(FileNotFoundError, match="purify_subset"):
        load_purified(str(tmp_path / "empty"))


def standard_normal_score(variables, x, t):
    return -x  # the score of N(0, I) data at every t: no network to build


def toy_purifier(t_star=0.02, dt=0.01) -> Purifier:
    score = ScoreModel({}, standard_normal_score, VPSDE(), (8, 8, 1))
    return Purifier(score, PurifyConfig(t_star=t_star, dt=dt))


def test_purify_subset_keeps_the_purifiers_own_draw_and_records_its_settings(tmp_path):
    x, index = images(5), np.arange(20, 25)
    purifier = toy_purifier()
    out = str(tmp_path / "p")
    desc = {"score": "toy"}
    kept = purify_subset(purifier, x, index, out, 3, desc, chunk_size=2, progress=False)
    direct = purifier(jnp.asarray(x), jax.random.key(3), jnp.asarray(index))
    np.testing.assert_allclose(kept, np.asarray(direct), atol=1e-6)
    np.testing.assert_array_equal(load_purified(out)[1], kept)

    # Another reverse draw: the same forward diffusion solved back with other reverse noise.
    other = purify_subset(purifier, x, index, str(tmp_path / "r1"), 3, desc, 2, False, 1)
    assert np.abs(other - kept).max() > 1e-3
    with pytest.raises(ValueError, match="different settings"):  # another dt in the same place
        purify_subset(toy_purifier(dt=0.02), x, index, out, 3, desc, 2, False)
    with pytest.raises(ValueError, match="different settings"):
        purify_subset(purifier, x, index, out, 4, desc, 2, False)  # another seed
    # A gradient-only setting does not change the values, so the kept work is reused.
    again = purify_subset(purifier.replace(grad="adjoint"), x, index, out, 3, desc, 2, False)
    np.testing.assert_array_equal(again, kept)
