"""Train a small WideResNet on Fashion-MNIST, standard or PGD adversarial training (Madry et al.).

    python -m experiments.train_classifier                          # checkpoints/fmnist-wrn-16-1
    python -m experiments.train_classifier --config pgd             # the PGD-trained baseline
    python -m experiments.train_classifier --init-from checkpoints/fmnist-wrn-16-1 \\
        --diffuse-t-star 0.1 --epochs 3 --lr 0.02 \\
        --out workdir/diag/fmnist-wrn-16-1-diffused                 # a classifier of x_t*

The settings are the config `experiments/configs/train_classifier.py` (`--config pgd`, the
PGD-trained baseline, is `--adversarial-eps 0.1 --pgd-steps 5 --epochs 4 --out
checkpoints/fmnist-wrn-16-1-pgd`); every flag overrides one of its fields, and every field of the
library's `ClassifierTraining` (diffpure_jax/train/classifier.py) is a flag: `--adversarial-eps`
> 0 trains on PGD examples (`--norm`, `--pgd-steps`), `--noise-std` > 0 adds Gaussian noise to
half of each batch, `--diffuse-t-star` > 0 trains on forward-diffused images x_t*.

Killed and rerun with the same flags, training continues from its last checkpoint in --workdir.
The final weights are exported to --out with a config.json (test accuracy included), ready for
`diffpure_jax.load_classifier(--out)`. See diffpure_jax/train/classifier.py.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from diffpure_jax import load_classifier, models
from diffpure_jax.checkpoint import read_config, save_variables
from diffpure_jax.data import DataNotFoundError, as_arrays, fashion_mnist_source
from diffpure_jax.train import train_classifier
from experiments.config import UsageError, cli_main, parse_config
from experiments.configs import train_classifier as config_module
from experiments.configs.train_classifier import TrainClassifierRun

PROG = "python -m experiments.train_classifier"


def get_run(argv=None) -> TrainClassifierRun:
    """The run's config: the config module's variant with the command line's overrides."""
    title, _, settings = __doc__.split("\n\n")[:3]  # the title and the settings paragraph
    return parse_config(config_module, argv, PROG, " ".join(f"{title} {settings}".split()))


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
        raise UsageError(
            f"--init-from {directory} is a {config.get('architecture')} {config.get('kwargs')}; "
            f"pass --depth/--widen-factor to match it (now {kwargs})"
        )
    return load_classifier(directory).variables


@cli_main
def main(argv=None, after_step=None) -> dict:
    run = get_run(argv)
    if os.path.exists(os.path.join(run.out, "variables")):
        raise UsageError(f"{run.out} already holds a checkpoint; remove it or pass another --out.")
    try:
        x, y = as_arrays(fashion_mnist_source("train", run.data_dir))
        x_test, y_test = as_arrays(fashion_mnist_source("test", run.data_dir))
    except DataNotFoundError as e:
        raise UsageError(str(e)) from e
    if run.n_train:
        x, y = x[: run.n_train], y[: run.n_train]
    loop = run.loop(len(x))
    kwargs = run.model_kwargs()
    module = models.build_model("wideresnet", kwargs)
    init_variables, provenance = None, {}
    if run.init_from:
        init_variables = _initial_variables(run.init_from, kwargs)
        provenance["init_from"] = run.init_from
    config, variables = train_classifier(
        x,
        y,
        None,
        run.train_workdir(),
        "wideresnet",
        kwargs,
        loop,
        run.training,
        run.progress,
        after_step,
        init_variables=init_variables,
        provenance=provenance,
    )
    accuracy = test_accuracy(module.apply, variables, x_test, y_test)
    config["training"]["command"] = f"{PROG} " + " ".join(argv or [])
    config["test_accuracy"] = accuracy
    save_variables(run.out, variables, config)
    print(
        f"classifier ({loop.n_steps} steps) saved to {run.out}: clean test accuracy {accuracy:.2f}%"
    )
    return config


if __name__ == "__main__":
    main(sys.argv[1:])
