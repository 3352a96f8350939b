"""BPDA+EOT (or AutoAttack, PGD-EOT, StAdv) against DiffPure on CelebA-HQ, resumable.

    python -m experiments.celebahq_autoattack --attribute Eyeglasses --data-dir DIR   # the paper's
    python -m experiments.celebahq_autoattack --attribute Smiling --grad exact \\
        --attack pgd-eot-final --eot 15 --protocols one_draw worst_of_10 --data-dir DIR
    python -m experiments.celebahq_autoattack --grad exact --attack autoattack --version rand

The settings are the config `experiments/configs/celebahq_autoattack.py` (`--help` shows every
default); every flag overrides one of its fields, and `--attribute` also picks its classifier
(checkpoints/celebahq-<attribute>). The checkpoints are converted from the official files
(checkpoints/README.md); the data is a local copy of CelebA-HQ in DiffPure's layout (the error
message says which). Runs, resume, devices and multi-host options are those of
`experiments.cifar_autoattack`.
"""

from __future__ import annotations

from experiments import attack
from experiments.config import cli_main, parse_config
from experiments.configs import celebahq_autoattack as config_module


def get_run(argv=None) -> attack.AttackRun:
    """The run's config: the config module's variant with the command line's overrides."""
    return parse_config(
        config_module, argv, "python -m experiments.celebahq_autoattack", __doc__.splitlines()[0],
        arg_flags=("attribute",),
    )  # fmt: skip


@cli_main
def main(argv=None, after_batch=None) -> dict:
    return attack.run_single(get_run(argv), after_batch)


if __name__ == "__main__":
    main()
