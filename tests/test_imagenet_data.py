"""The ImageNet validation loader: DiffPure's Resize(256) + CenterCrop(224), the seeded subset,
and a missing dataset refused at once with what to do (tfds mock data, no real ImageNet)."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffpure_jax.data import DataNotFoundError, imagenet_val, resize_center_crop


def test_resize_center_crop_as_torchvision():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # landscape: short side is H
    out = resize_center_crop(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # Resize(256): (300, 400) -> (256, int(256 * 400 / 300)) = (256, 341); crop offsets
    # round((256 - 224) / 2) = 16 and round((341 - 224) / 2) = round(58.5) = 58.
    resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
    np.testing.assert_array_equal(out, resized[16:240, 58:282])
    portrait = resize_center_crop(image.transpose(1, 0, 2))
    resized = np.asarray(
        Image.fromarray(image.transpose(1, 0, 2)).resize((256, 341), Image.BILINEAR)
    )
    np.testing.assert_array_equal(portrait, resized[58:282, 16:240])
    # A 256-pixel short side is not resampled, only cropped.
    square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(square), square[16:240, 16:240])


def test_seeded_subset_of_mock_validation_set():
    with tfds.testing.mock_data(num_examples=12):
        x, y, index = imagenet_val(5, seed=3)
        again = imagenet_val(5, seed=3)
        other = imagenet_val(5, seed=4)
    assert x.shape == (5, 224, 224, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == np.int32 and ((0 <= y) & (y < 1000)).all()
    assert len(set(index.tolist())) == 5 and index.max() < 12
    np.testing.assert_array_equal(index, np.random.RandomState(3).choice(12, 5, replace=False))
    np.testing.assert_array_equal(x, again[0])
    assert not np.array_equal(index, other[2])
    with tfds.testing.mock_data(num_examples=12), pytest.raises(ValueError, match="12"):
        imagenet_val(13, seed=0)


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as err:
        imagenet_val(4, 0, str(tmp_path))
    assert time.monotonic() - start < 30  # no download, no hang
    message = str(err.value)
    assert "ILSVRC2012_img_val.tar" in message and "downloads/manual" in message
    assert "file_format='array_record'" in message and "--data-dir" in message
    assert len(message.splitlines()) <= 6
