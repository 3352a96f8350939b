"""The CelebA-HQ loader on a small generated copy in DiffPure's layout (images/, the attribute
and partition lists): labels, partitions, the seeded subset and DiffPure's own protocol."""

import numpy as np
import pytest
from helpers import make_celebahq

from diffpure_jax.data import (
    CelebAHQ,
    DataNotFoundError,
    celebahq_paper_indices,
    celebahq_val,
)


def test_labels_partitions_and_images(tmp_path):
    data = CelebAHQ(str(make_celebahq(tmp_path)))
    assert data.files[:2] == ["000001.png", "000002.png"]  # sorted, as DiffPure's ImageFolder
    np.testing.assert_array_equal(data.partition("val"), [1, 4, 7, 10])
    np.testing.assert_array_equal(data.labels("Eyeglasses")[:4], [1, 0, 0, 1])  # -1 -> 0
    np.testing.assert_array_equal(data.labels("Smiling")[:3], [1, 0, 1])
    image = data.image(0)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8  # Resize(256)
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Glasses'"):
        data.labels("Glasses")


def test_seeded_subset_and_the_papers_protocol(tmp_path):
    root = str(make_celebahq(tmp_path))
    x, y, index = celebahq_val(3, 0, root, "Eyeglasses")
    assert x.shape == (3, 256, 256, 3) and 0 <= x.min() and x.max() <= 1
    assert set(index.tolist()) <= {1, 4, 7, 10}
    np.testing.assert_array_equal(y, CelebAHQ(root).labels("Eyeglasses")[index])
    np.testing.assert_array_equal(index, celebahq_val(3, 0, root)[2])
    # DiffPure's protocol: per data seed the first 8 of a 2% subset of val; repeats dropped.
    val = np.arange(100, 400)
    paper = celebahq_paper_indices(val)
    first = np.random.RandomState(0).choice(val, 6, replace=False)[:8]
    np.testing.assert_array_equal(paper[: len(first)], first)
    assert len(np.unique(paper)) == len(paper) <= 64 * 6
    assert set(paper.tolist()) == {
        int(v) for s in range(64) for v in np.random.RandomState(s).choice(val, 6, replace=False)
    }
    with pytest.raises(ValueError, match="has 0"):  # 2% of 4 validation images is none
        celebahq_val(2, -1, root)


def test_missing_layout_says_what_is_expected(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        celebahq_val(2, 0, str(tmp_path))
    message = str(err.value)
    assert "missing images, list_attr_celeba.txt, list_eval_partition.txt" in message
    assert "--data-dir" in message and len(message.splitlines()) <= 6
