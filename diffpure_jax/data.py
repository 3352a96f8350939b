"""Evaluation data: image datasets as (x (N, H, W, C) float32 in [0, 1], y (N,) int32) arrays.

CIFAR-10 comes from tensorflow-datasets' random-access `data_source` (no TensorFlow needed). It is
never downloaded at run time: prepare it once on a machine with internet access (array_record
format) and point `data_dir` at the copy. Tests use `tfds.testing.mock_data`.

Fashion-MNIST is read from the four IDX files of Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist/`), with the same interface as a tfds source: a random-access
sequence of {"image": (28, 28, 1) uint8, "label": int} dicts.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
INSTALL_FASHION_MNIST = (
    "Fashion-MNIST is not in {data_dir} (missing {missing}). Install it with\n"
    "  apt-get install dataset-fashion-mnist\n"
    "(Debian/Ubuntu; it puts the four IDX .gz files in " + FASHION_MNIST_DIR + "), or pass "
    "--data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)

PREPARE_CIFAR10 = (
    "CIFAR-10 is not prepared in {data_dir}. On a machine with internet access run\n"
    "  python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10', "
    "data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
    "(needs `pip install tensorflow`), copy DIR/cifar10 here and pass --data-dir DIR. "
    "Nothing is downloaded at run time."
)


class DataNotFoundError(FileNotFoundError):
    """A dataset is not available locally; the message says how to get it."""


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """The evaluation subset: n distinct indices of [0, n_total), a deterministic function of seed.

    Chosen with NumPy's RandomState(seed).choice without replacement (DiffPure picks its 512
    CIFAR-10 test images with RandomState(data_seed)); returned in the order drawn.
    """
    if not 0 < n <= n_total:
        raise ValueError(f"cannot choose {n} examples out of {n_total}")
    return np.random.RandomState(seed).choice(n_total, n, replace=False).astype(np.int64)


def tfds_source(name: str, split: str, data_dir: str | None):
    """A prepared tfds dataset split as a random-access sequence of dicts (never downloads)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing / TFRecord-only dataset
        where = data_dir or "~/tensorflow_datasets"
        if name == "cifar10":
            raise DataNotFoundError(PREPARE_CIFAR10.format(data_dir=where)) from e
        raise DataNotFoundError(f"{name} ({split}) is not prepared in {where}") from e


def _open_idx(data_dir: str, stem: str):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path, (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb"))
    return None, None


def read_idx(path: str, f, magic: int, n_expected: int | None) -> np.ndarray:
    """The uint8 array in an IDX file (big-endian header: magic, then one int32 per dimension).

    Checks the magic number, the dimension count, that the payload has exactly the size the
    header promises, and (when given) the number of items.
    """
    with f:
        data = f.read()
    n_dims = magic & 0xFF
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: IDX magic number {found:#010x}, expected {magic:#010x} "
            f"(unsigned bytes, {n_dims} dimensions); the file is corrupt or of another kind."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header promises shape {shape} ({int(np.prod(shape))} bytes) but the file "
            f"holds {len(data) - header} bytes; reinstall dataset-fashion-mnist."
        )
    if n_expected is not None and shape[0] != n_expected:
        raise ValueError(f"{path}: {shape[0]} items, expected {n_expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


class ArraySource:
    """In-memory images and labels with the tfds `data_source` interface.

    `images` (N, H, W, C) uint8, `labels` (N,) int32; `source[i]` is {"image", "label"}.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def fashion_mnist_source(
    split: str, data_dir: str | None = None, check_size: bool = True
) -> ArraySource:
    """Fashion-MNIST `split` ('train' 60000 or 'test' 10000) as an ArraySource of 28x28x1 images.

    Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `data_dir` (default: Debian's
    /usr/share/datasets/fashion-mnist). `check_size=False` accepts any item count (tests).
    """
    if split not in _IDX_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_IDX_FILES)}, got {split!r}")
    data_dir = data_dir or FASHION_MNIST_DIR
    image_stem, label_stem, n = _IDX_FILES[split]
    image_path, image_file = _open_idx(data_dir, image_stem)
    label_path, label_file = _open_idx(data_dir, label_stem)
    if image_file is None or label_file is None:
        missing = [
            s + ".gz" for s, f in ((image_stem, image_file), (label_stem, label_file)) if f is None
        ]
        for f in (image_file, label_file):
            if f is not None:
                f.close()
        raise DataNotFoundError(
            INSTALL_FASHION_MNIST.format(data_dir=data_dir, missing=", ".join(missing))
        )
    n = n if check_size else None
    images = read_idx(image_path, image_file, _IDX_IMAGES_MAGIC, n)
    labels = read_idx(label_path, label_file, _IDX_LABELS_MAGIC, n)
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels"
        )
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {labels.max()} is not a Fashion-MNIST class (0-9)")
    return ArraySource(images[..., None], labels)


def as_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, H, W, C) float32 in [0, 1], y (N,) int32): a whole source, for training."""
    if isinstance(source, ArraySource):
        return source.images.astype(np.float32) / 255.0, source.labels
    return take(source, np.arange(len(source)))


def take(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, H, W, C) float32 in [0, 1], y (n,) int32) for the given indices of a source."""
    examples = [source[int(i)] for i in indices]
    x = np.stack([np.asarray(ex["image"]) for ex in examples]).astype(np.float32) / 255.0
    y = np.asarray([int(ex["label"]) for ex in examples], dtype=np.int32)
    return x, y


def _check_n(n: int, size: int, name: str) -> int:
    if not 1 <= n <= size:
        raise ValueError(f"asked for {n} test images, but the {name} test set has {size}")
    return n


def cifar10_test(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 32, 32, 3) in [0, 1], y (n,), index (n,)): seeded subset of the CIFAR-10 test set."""
    source = tfds_source("cifar10", "test", data_dir)
    index = subset_indices(len(source), _check_n(n, len(source), "CIFAR-10"), seed)
    x, y = take(source, index)
    return x, y, index


def fashion_mnist_test(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 28, 28, 1) in [0, 1], y (n,), index (n,)): a seeded Fashion-MNIST test subset."""
    source = fashion_mnist_source("test", data_dir)
    index = subset_indices(len(source), _check_n(n, len(source), "Fashion-MNIST"), seed)
    x, y = take(source, index)
    return x, y, index
