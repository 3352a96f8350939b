"""What the Fashion-MNIST reports share: default checkpoints, flags, the kept purified test
images, batching, scores and plotting."""

from __future__ import annotations

import json
import os

import numpy as np

from diffpure_jax import load_purifier
from diffpure_jax.data import FASHION_MNIST_CLASSES, DataNotFoundError, fashion_mnist_test
from diffpure_jax.purified import purify_subset
from experiments.config import UsageError

SCORE = "checkpoints/fmnist-ncsnpp-small"
CLASSIFIER = "checkpoints/fmnist-wrn-16-1"
ADV_CLASSIFIER = "checkpoints/fmnist-wrn-16-1-pgd"
PURIFIED_ROOT = "workdir/purified"


def load_test_subset(n: int, data_seed: int, data_dir: str | None = None):
    """(x (n, 28, 28, 1) in [0, 1], y (n,), index (n,)): the seeded Fashion-MNIST test subset;
    exits with the download hint when the data is missing."""
    try:
        return fashion_mnist_test(n, data_seed, data_dir)
    except DataNotFoundError as e:
        raise UsageError(str(e)) from e


def purified_dir(
    split: str, t_star: float, dt: float, seed: int, root: str, reverse_draw: int = 0
) -> str:
    """Where the purified copies of a Fashion-MNIST split live under `root`."""
    name = f"fmnist-{split}-t{t_star}-dt{dt}-seed{seed}"
    return os.path.join(root, name + (f"-reverse{reverse_draw}" if reverse_draw else ""))


def add_purified_test_args(parser) -> None:
    """The flags of the reports that purify test images and keep them (`purified_test_images`)."""
    parser.add_argument("--score", default=SCORE)
    parser.add_argument("--dt", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=200, help="also the size of a kept chunk")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--purified-root",
        default=PURIFIED_ROOT,
        help="where the purified test images are kept (a rerun reads them back)",
    )
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the numbers as JSON")


def purified_test_images(args, t_star: float, reverse_draw: int = 0, purifier=None):
    """(x, y, index, purified): the seeded subset of args.n test images and one purification
    of each (noise keyed by args.seed and the dataset index), kept under args.purified_root and
    resumed (`diffpure_jax.purified.purify_subset`). x and purified are (n, 28, 28, 1), y and
    index (n,). `args` carries the flags of `add_purified_test_args` and --n; `purifier`
    (loaded from args.score at t_star and args.dt when None) saves reloading it."""
    x, y, index = load_test_subset(args.n, args.data_seed, args.data_dir)
    if purifier is None:
        purifier = load_purifier(args.score, t_star=t_star, dt=args.dt)
    out = purified_dir("test", t_star, args.dt, args.seed, args.purified_root, reverse_draw)
    description = {"score": args.score, "split": "test", "data_seed": args.data_seed}
    purified = purify_subset(
        purifier, x, index, out, args.seed, description, args.batch_size,
        not args.no_progress, reverse_draw,
    )  # fmt: skip
    return x, y, index, purified


def batched(fn, batch, *arrays):
    """fn over consecutive batches of the (equally long) arrays, outputs concatenated (numpy)."""
    n = len(arrays[0])
    return np.concatenate(
        [np.asarray(fn(*(a[i : i + batch] for a in arrays))) for i in range(0, n, batch)]
    )


def scores(pred, y) -> dict:
    """Accuracy (%) and per-class [n, correct] of predictions against labels."""
    return scores_of_correct(pred == y, y)


def scores_of_correct(correct, y) -> dict:
    """Accuracy (%) and per-class [n, correct] of per-example correctness (bool) with labels."""
    return {
        "accuracy": 100.0 * float(np.mean(correct)),
        "per_class": {
            name: [int(np.sum(y == k)), int(np.sum(correct & (y == k)))]
            for k, name in enumerate(FASHION_MNIST_CLASSES)
        },
    }


def write_json(result, path: str | None) -> None:
    """Write result as indented JSON to path (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def read_summary(workdir: str) -> dict:
    """The summary.json of an evaluation workdir (`experiments.fashion_mnist_autoattack`)."""
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the figures need matplotlib: pip install -e '.[figures]'") from None
    return plt


def image_grid(rows: list[np.ndarray], path: str, row_labels=None, titles=None) -> None:
    """Save rows of (n, H, W, 1) images in [0, 1] as one PNG; titles: per-row lists of text."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols, 1.25 * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(np.asarray(row[j])[..., 0], cmap="gray", vmin=0, vmax=1)
                if titles is not None:
                    ax.set_title(titles[i][j], fontsize=6)
        if row_labels is not None:
            axes[i][0].text(-4, 14, row_labels[i], ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
