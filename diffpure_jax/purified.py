"""Purified copies of a set of images, kept on disk and resumable.

Purifying is the expensive part of every purified-accuracy measurement (its cost per image is in
the README), so it is a job of its own: `purify_dataset` writes chunks of
purified images to a workdir, each chunk atomically, and a rerun skips the chunks already there.
`purify_subset` is that job for a `Purifier`: one draw per image, the noise keyed by
(seed, dataset index), so the result does not depend on the chunk size or on where a run was
killed, and scoring another classifier on the same purified images takes seconds.

Workdir layout:
    run_config.json          the settings; a rerun with other settings refuses and keeps the work
    chunk_NNNNNN.npz         index (n,) int64 dataset indices, x (n, H, W, C) float32 purified
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np

from . import noise
from .progress import progress_bar_or_none
from .purify import Purifier, PurifyConfig, purify_with_keys
from .workdir import check_run_config

# PurifyConfig fields that change only gradients, not the purified values.
_GRADIENT_ONLY = ("grad", "checkpoints")


def _chunk_path(workdir: str, start: int) -> str:
    return os.path.join(workdir, f"chunk_{start:06d}.npz")


def purify_dataset(
    purify_batch,
    x: np.ndarray,
    index: np.ndarray,
    workdir: str,
    description: dict,
    chunk_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Purify x in chunks, resumably; return the purified images (N, H, W, C) in the order of x.

    Args:
      purify_batch: (x (n, H, W, C) in [0, 1], index (n,)) -> purified (n, H, W, C); a pure
        function of its arguments (e.g. a jitted purifier with a fixed key).
      x: (N, H, W, C) float32 images in [0, 1]; index: (N,) their dataset indices.
      workdir: where the chunks go. `description` (the purifier's settings, the data and the
        seed) is recorded there, and a rerun with another description refuses. A chunk already
        there with the same indices is kept, so a run over a longer prefix of the same index
        order extends a shorter one.
      chunk_size: images per chunk file (the unit of resumption).
    """
    if len(x) != len(index):
        raise ValueError(f"{len(x)} images but {len(index)} indices")
    index = np.asarray(index, np.int64)
    check_run_config(workdir, {**description, "chunk_size": chunk_size})
    starts = range(0, len(x), chunk_size)
    todo = [s for s in starts if not _chunk_matches(workdir, s, index[s : s + chunk_size])]
    done = len(x) - sum(len(index[s : s + chunk_size]) for s in todo)
    bar = progress_bar_or_none(len(x), progress, "purifying", "image", initial=done)
    for s in todo:
        xb, ib = x[s : s + chunk_size], index[s : s + chunk_size]
        purified = np.asarray(jax.device_get(purify_batch(xb, ib)), np.float32)
        path = _chunk_path(workdir, s)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, index=ib, x=purified)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)  # a kill leaves either the whole chunk or none
        bar.update(len(xb))
    bar.close()
    return np.concatenate([_read_chunk(workdir, s) for s in starts])


def _read_chunk(workdir: str, start: int) -> np.ndarray:
    with np.load(_chunk_path(workdir, start)) as chunk:
        return chunk["x"]


def _chunk_matches(workdir: str, start: int, index: np.ndarray) -> bool:
    path = _chunk_path(workdir, start)
    if not os.path.exists(path):
        return False
    with np.load(path) as chunk:
        return np.array_equal(chunk["index"], index)


def load_purified(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(index (n,) int64, x (n, H, W, C) float32): every chunk in `workdir`, in chunk order."""
    paths = sorted(glob.glob(os.path.join(workdir, "chunk_*.npz")))
    if not paths:
        raise FileNotFoundError(
            f"{workdir} holds no purified chunks; make them with "
            "`diffpure_jax.purified.purify_subset` (or `purify_dataset`)"
        )
    index, x = [], []
    for path in paths:
        with np.load(path) as chunk:
            index.append(chunk["index"])
            x.append(chunk["x"])
    return np.concatenate(index), np.concatenate(x)


@jax.jit
def _purify_keyed(purifier: Purifier, x, index, key, reverse_draw):
    # reverse_draw 0: reverse_keys == keys, the purifier's own draw (`purify(..., draw=0)`).
    keys = noise.example_keys(key, index, 0)
    reverse_keys = noise.example_keys(key, index, reverse_draw)
    return purify_with_keys(purifier.score, purifier.config, x, keys, reverse_keys)


def _config_settings(config: PurifyConfig) -> dict:
    """t_star and dt, and every other PurifyConfig field that differs from its default and
    changes the purified values."""
    default = PurifyConfig()
    settings = {"t_star": config.t_star, "dt": config.dt}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in (*settings, *_GRADIENT_ONLY) and value != getattr(default, field.name):
            settings[field.name] = value
    return settings


def purify_subset(
    purifier: Purifier,
    x: np.ndarray,
    index: np.ndarray,
    out: str,
    seed: int,
    description: dict,
    chunk_size: int = 256,
    progress: bool = True,
    reverse_draw: int = 0,
) -> np.ndarray:
    """One purification of each image, kept in `out` and resumable (`purify_dataset`).

    Args:
      purifier: the Purifier (score model and PurifyConfig).
      x: (N, H, W, C) float32 images in [0, 1]; index: (N,) their dataset indices. The noise of
        image i is keyed by (seed, index[i]): draw 0 equals `purifier(x, jax.random.key(seed),
        index)`, whatever the chunk size or the images around it.
      out: the workdir of the chunks.
      description: what identifies the score model and the images, which the purifier cannot
        tell (e.g. {"score": checkpoint path, "split": "test", "data_seed": 0}). It is recorded
        with the seed, t_star, dt and any non-default PurifyConfig field that changes the values;
        a rerun with other settings refuses and keeps the work.
      chunk_size: images per chunk file (the unit of resumption).
      reverse_draw: > 0: the same forward diffusion x_t* as draw 0, solved back with other
        reverse noise (the reverse SDE's own randomness).
    Returns: (N, H, W, C) float32 purified images in the order of x.
    """
    key = jax.random.key(seed)
    settings = {
        **description,
        **_config_settings(purifier.config),
        "seed": seed,
        **({"reverse_draw": reverse_draw} if reverse_draw else {}),
    }
    return purify_dataset(
        lambda xb, ib: _purify_keyed(purifier, xb, ib, key, reverse_draw),
        x,
        index,
        out,
        settings,
        chunk_size,
        progress,
    )
