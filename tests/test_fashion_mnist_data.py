"""The Fashion-MNIST IDX loader, on small generated IDX files."""

import gzip

import numpy as np
import pytest

from diffpure_jax.data import (
    DataNotFoundError,
    as_arrays,
    fashion_mnist_source,
    fashion_mnist_test,
    take,
)


def write_idx(path, array: np.ndarray, magic_type=0x08, compress=True):
    header = bytes([0, 0, magic_type, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_split(directory, prefix, n, seed, compress=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_reads_generated_idx_files_like_a_tfds_source(tmp_path, compress):
    images, labels = make_split(tmp_path, "t10k", 7, seed=1, compress=compress)
    source = fashion_mnist_source("test", str(tmp_path), check_size=False)
    assert len(source) == 7
    ex = source[3]
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][..., 0], images[3])
    assert ex["label"] == labels[3]
    x, y = take(source, np.array([5, 0]))
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, ..., 0], images[5] / 255.0)
    np.testing.assert_array_equal(y, labels[[5, 0]])
    xa, ya = as_arrays(source)
    np.testing.assert_allclose(xa[..., 0], images / 255.0)
    assert 0.0 <= xa.min() and xa.max() <= 1.0


def test_checks_the_official_sizes(tmp_path):
    make_split(tmp_path, "t10k", 7, seed=1)
    with pytest.raises(ValueError, match="7 items, expected 10000"):
        fashion_mnist_source("test", str(tmp_path))


def test_bad_magic_and_truncated_payload_are_caught(tmp_path):
    make_split(tmp_path, "train", 4, seed=2)
    labels = np.zeros(4, np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, magic_type=0x0B)  # int16, not ubyte
    with pytest.raises(ValueError, match="magic number"):
        fashion_mnist_source("train", str(tmp_path), check_size=False)
    make_split(tmp_path, "train", 4, seed=2)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="header promises"):
        fashion_mnist_source("train", str(tmp_path), check_size=False)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_source("train", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        fashion_mnist_source("validation", str(tmp_path))


def test_seeded_test_subset(tmp_path, monkeypatch):
    make_split(tmp_path, "t10k", 10_000, seed=3)
    x1, y1, i1 = fashion_mnist_test(5, seed=4, data_dir=str(tmp_path))
    x2, y2, i2 = fashion_mnist_test(5, seed=4, data_dir=str(tmp_path))
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(x1, x2)
    assert len(set(i1.tolist())) == 5
    assert not np.array_equal(i1, fashion_mnist_test(5, seed=5, data_dir=str(tmp_path))[2])
