"""AutoAttack (or PGD-EOT, BPDA+EOT) against DiffPure on ImageNet, resumable.

    python -m experiments.imagenet_autoattack --data-dir DIR          # the paper's: ResNet-50
    python -m experiments.imagenet_autoattack --config deit-s         # or wrn-50-2
    python -m experiments.imagenet_autoattack --grad exact --protocols one_draw worst_of_10
    python -m experiments.imagenet_autoattack --score-dtype bfloat16  # the fp16 torso's analogue

The settings are the config `experiments/configs/imagenet_autoattack.py` (`--help` shows every
default); every flag overrides one of its fields. The checkpoints are converted from the
official files (checkpoints/README.md), the data is the user's own ImageNet validation set
prepared for tensorflow-datasets (the error message says how). Runs, resume, devices and
multi-host options are those of `experiments.cifar_autoattack`.
"""

from __future__ import annotations

from experiments import attack
from experiments.config import cli_main, parse_config
from experiments.configs import imagenet_autoattack as config_module


def get_run(argv=None) -> attack.AttackRun:
    """The run's config: the config module's variant with the command line's overrides."""
    return parse_config(
        config_module, argv, "python -m experiments.imagenet_autoattack", __doc__.splitlines()[0]
    )


@cli_main
def main(argv=None, after_batch=None) -> dict:
    return attack.run_single(get_run(argv), after_batch)


if __name__ == "__main__":
    main()
