"""Purify Fashion-MNIST images (one draw each), resumably, for purification-aware training.

    python -m experiments.purify_train_set --n 16384   # workdirs/purified/fmnist-train-t0.1-...
    python -m experiments.train_classifier --init-from checkpoints/fmnist-wrn-16-1 \\
        --purified workdirs/purified/fmnist-train-t0.1-dt0.001-seed1 ...   # then fine-tune

The images are a seeded subset of the split (`--data-seed`; a larger --n extends a smaller one,
which keeps its chunks). Killed and rerun with the same flags, it continues from the last
finished chunk. `fashion_mnist_report accuracy` keeps its purified test images the same way.
See diffpure_jax/train/purified.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from diffpure_jax import load_purifier, noise
from diffpure_jax.data import DataNotFoundError, fashion_mnist_source, subset_indices, take
from diffpure_jax.purify import purify_with_keys
from diffpure_jax.train.purified import purify_dataset

# The test-set evaluations purify with seed 0; the training copies default to another seed, as
# dataset indices overlap between the splits.
DEFAULT_SEED = {"train": 1, "test": 0}
PURIFIED_ROOT = "workdirs/purified"


def purified_dir(
    split: str,
    t_star: float,
    dt: float,
    seed: int,
    root: str = PURIFIED_ROOT,
    reverse_draw: int = 0,
) -> str:
    """Where the purified copies of a split live by default."""
    name = f"fmnist-{split}-t{t_star}-dt{dt}-seed{seed}"
    return os.path.join(root, name + (f"-reverse{reverse_draw}" if reverse_draw else ""))


def purify_split(
    score: str,
    split: str,
    n: int,
    data_seed: int,
    t_star: float,
    dt: float,
    seed: int,
    chunk_size: int,
    out: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    root: str = PURIFIED_ROOT,
    reverse_draw: int = 0,
):
    """(x, y, index, purified): a seeded subset of n images of a Fashion-MNIST split and one
    purification of each (noise keyed by seed and dataset index), kept in `out` and resumable.
    x and purified are (n, 28, 28, 1), y and index (n,).

    reverse_draw > 0: the same forward diffusion x_t* as draw 0, solved back with other reverse
    noise (the reverse SDE's own randomness; `fashion_mnist_report reverse-draws`)."""
    try:
        source = fashion_mnist_source(split, data_dir)
    except DataNotFoundError as e:
        raise SystemExit(str(e)) from e
    # Prefix-stable: the first chunks of a larger n are those of a smaller one.
    index = subset_indices(len(source), min(n, len(source)), data_seed)
    x, y = take(source, index)
    purifier = load_purifier(score, t_star=t_star, dt=dt)
    key = jax.random.key(seed)

    @jax.jit
    def purify(p, xb, ib):  # reverse_draw 0: reverse_keys == keys, the purifier's own draw
        keys, reverse_keys = (noise.example_keys(key, ib, d) for d in (0, reverse_draw))
        return purify_with_keys(p.score, p.config, xb, keys, reverse_keys)

    description = {
        "score": score,
        "t_star": t_star,
        "dt": dt,
        "seed": seed,
        "data_seed": data_seed,
        "split": split,
        **({"reverse_draw": reverse_draw} if reverse_draw else {}),
    }
    purified = purify_dataset(
        lambda xb, ib: purify(purifier, xb, ib),
        x,
        index,
        out or purified_dir(split, t_star, dt, seed, root, reverse_draw),
        description,
        chunk_size,
        progress,
    )
    return x, y, index, purified


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.purify_train_set", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default=None, help="workdir (default: workdirs/purified/fmnist-...)")
    p.add_argument("--score", default="checkpoints/fmnist-ncsnpp-small")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--n", type=int, default=16384, help="number of images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the subset")
    p.add_argument("--t-star", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1e-3)
    p.add_argument(
        "--seed", type=int, default=None, help="noise seed (default: 1 for train, 0 for test)"
    )
    p.add_argument("--chunk-size", type=int, default=200)
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else DEFAULT_SEED[args.split]
    out = args.out or purified_dir(args.split, args.t_star, args.dt, seed)
    _, _, _, purified = purify_split(
        args.score,
        args.split,
        args.n,
        args.data_seed,
        args.t_star,
        args.dt,
        seed,
        args.chunk_size,
        out,
        args.data_dir,
        not args.no_progress,
    )
    print(f"{len(purified)} purified {args.split} images in {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
