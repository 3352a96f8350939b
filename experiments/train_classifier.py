"""Train a small WideResNet on Fashion-MNIST, standard or PGD adversarial training (Madry et al.).

    python -m experiments.train_classifier                          # checkpoints/fmnist-wrn-16-1
    python -m experiments.train_classifier --adversarial-eps 0.1 \\
        --out checkpoints/fmnist-wrn-16-1-pgd                       # the adversarial baseline
    python -m experiments.train_classifier --init-from checkpoints/fmnist-wrn-16-1 \\
        --purified workdirs/purified/fmnist-train-t0.1-dt0.001-seed1 --purified-prob 1 \\
        --epochs 2 --lr 0.01 --out workdirs/diag/fmnist-wrn-16-1-pa  # purification-aware

Killed and rerun with the same flags, training continues from its last checkpoint in --workdir.
The final weights are exported to --out with a config.json (test accuracy included), ready for
`diffpure_jax.load_classifier(--out)`. See diffpure_jax/train/classifier.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from diffpure_jax import load_classifier, models
from diffpure_jax.checkpoint import read_config, save_variables
from diffpure_jax.data import DataNotFoundError, as_arrays, fashion_mnist_source
from diffpure_jax.train import ClassifierTraining, LoopConfig, train_classifier
from diffpure_jax.train.purified import load_purified, with_purified


def build_parser() -> argparse.ArgumentParser:
    d = ClassifierTraining()
    p = argparse.ArgumentParser(
        prog="python -m experiments.train_classifier", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default="checkpoints/fmnist-wrn-16-1")
    p.add_argument("--workdir", default=None, help="default: workdirs/train/<basename of --out>")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--widen-factor", type=int, default=1)
    p.add_argument("--epochs", type=float, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--adversarial-eps", type=float, default=0.0, help="PGD training eps (0: off)")
    p.add_argument(
        "--noise-std",
        type=float,
        default=0.0,
        help="Gaussian noise augmentation on half of each batch, std in [0, 1] pixel units "
        "(0: off; 0.16 is the noise level of t* = 0.1)",
    )
    p.add_argument(
        "--diffuse-t-star",
        type=float,
        default=0.0,
        help="train on images forward-diffused to this t* (0: off); a diagnostic classifier",
    )
    p.add_argument(
        "--init-from", default=None, help="fine-tune this classifier checkpoint (same architecture)"
    )
    p.add_argument(
        "--purified",
        default=None,
        help="workdir of purified training images (experiments.purify_train_set)",
    )
    p.add_argument(
        "--purified-prob",
        type=float,
        default=1.0,
        help="with --purified: chance that an image with a purified copy is shown purified",
    )
    p.add_argument("--norm", choices=["Linf", "L2"], default=d.norm)
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps)
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--no-progress", action="store_true")
    return p


def test_accuracy(module_apply, variables, x: np.ndarray, y: np.ndarray, batch: int = 500):
    """Clean accuracy (%) of a classifier on x (N, H, W, C) in [0, 1]."""
    predict = jax.jit(lambda v, xb: module_apply(v, xb).argmax(-1))
    correct = sum(
        int((np.asarray(predict(variables, x[i : i + batch])) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return 100.0 * correct / len(x)


def _initial_variables(directory: str, kwargs: dict) -> dict:
    """The variables of the classifier at `directory`, which must be a WideResNet like `kwargs`."""
    config = read_config(directory)
    if config.get("architecture") != "wideresnet" or config.get("kwargs") != kwargs:
        raise SystemExit(
            f"--init-from {directory} is a {config.get('architecture')} {config.get('kwargs')}; "
            f"pass --depth/--widen-factor to match it (now {kwargs})"
        )
    return load_classifier(directory).variables


def main(argv=None, after_step=None) -> dict:
    args = build_parser().parse_args(argv)
    if os.path.exists(os.path.join(args.out, "variables")):
        raise SystemExit(f"{args.out} already holds a checkpoint; remove it or pass another --out.")
    try:
        x, y = as_arrays(fashion_mnist_source("train", args.data_dir))
        x_test, y_test = as_arrays(fashion_mnist_source("test", args.data_dir))
    except DataNotFoundError as e:
        raise SystemExit(str(e)) from e
    if args.n_train:
        x, y = x[: args.n_train], y[: args.n_train]
    cfg = dataclasses.replace(
        ClassifierTraining(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        adversarial_eps=args.adversarial_eps,
        norm=args.norm,
        pgd_steps=args.pgd_steps,
        noise_std=args.noise_std,
        purified_prob=args.purified_prob if args.purified else 0.0,
        diffuse_t_star=args.diffuse_t_star,
    )
    n_steps = max(1, round(args.epochs * len(x) / args.batch_size))
    loop = LoopConfig(n_steps, args.batch_size, args.seed, args.save_every)
    workdir = args.workdir or os.path.join(
        "workdirs", "train", os.path.basename(os.path.normpath(args.out))
    )
    kwargs = {"depth": args.depth, "widen_factor": args.widen_factor, "num_classes": 10}
    module = models.build_model("wideresnet", kwargs)
    purified, init_variables, provenance = None, None, {}
    if args.purified:
        index, x_purified = load_purified(args.purified)
        if index.max() >= len(x):
            raise SystemExit(f"{args.purified} holds images beyond the {len(x)} training images")
        purified = with_purified(x, index, x_purified)
        provenance.update(purified=args.purified, n_purified=len(index))
    if args.init_from:
        init_variables = _initial_variables(args.init_from, kwargs)
        provenance["init_from"] = args.init_from
    config, variables = train_classifier(
        x,
        y,
        None,
        workdir,
        "wideresnet",
        kwargs,
        loop,
        cfg,
        not args.no_progress,
        after_step,
        purified=purified,
        init_variables=init_variables,
        provenance=provenance,
    )
    accuracy = test_accuracy(module.apply, variables, x_test, y_test)
    config["training"]["command"] = "python -m experiments.train_classifier " + " ".join(argv or [])
    config["test_accuracy"] = accuracy
    save_variables(args.out, variables, config)
    print(f"classifier ({n_steps} steps) saved to {args.out}: clean test accuracy {accuracy:.2f}%")
    return config


if __name__ == "__main__":
    main(sys.argv[1:])
