"""Evaluation data: image datasets as (x (N, H, W, C) float32 in [0, 1], y (N,) int32) arrays.

CIFAR-10 comes from tensorflow-datasets' random-access `data_source` (no TensorFlow needed). It is
never downloaded at run time: prepare it once on a machine with internet access (array_record
format) and point `data_dir` at the copy. Tests use `tfds.testing.mock_data`.
"""

from __future__ import annotations

import numpy as np

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


def take(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, H, W, C) float32 in [0, 1], y (n,) int32) for the given indices of a source."""
    examples = [source[int(i)] for i in indices]
    x = np.stack([np.asarray(ex["image"]) for ex in examples]).astype(np.float32) / 255.0
    y = np.asarray([int(ex["label"]) for ex in examples], dtype=np.int32)
    return x, y


def cifar10_test(n: int, seed: int, data_dir: str | None = None):
    """(x (n, 32, 32, 3) in [0, 1], y (n,), index (n,)): seeded subset of the CIFAR-10 test set."""
    source = tfds_source("cifar10", "test", data_dir)
    index = subset_indices(len(source), min(n, len(source)), seed)
    x, y = take(source, index)
    return x, y, index
