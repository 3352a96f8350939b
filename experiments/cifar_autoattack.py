"""AutoAttack (or PGD-EOT, BPDA+EOT) against DiffPure on CIFAR-10, resumable.

    python -m experiments.cifar_autoattack                       # the paper's CIFAR-10 Linf setting
    python -m experiments.cifar_autoattack --grad exact          # the honest, exact gradients
    python -m experiments.cifar_autoattack --version standard --protocols one_draw worst_of_10
    python -m experiments.cifar_autoattack --config L2           # or --norm L2: eps 0.5, t* 0.075

The settings are the config `experiments/configs/cifar_autoattack.py` (`--help` shows every
default); every flag overrides one of its fields. The paper reports the minimum over `rand` and
`standard`, so run both. A run goes to `--workdir/<row>-<hash of its settings>`; killed and rerun
with the same settings, it continues where it stopped (diffpure_jax/runner.py).

Each batch is split over all local devices. To split the batches over several processes or hosts
sharing the workdir, start one process per host with the same flags plus
`--coordinator HOST:PORT --num-processes N --process-id I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; Slurm and Open MPI jobs are detected). The results do not
depend on the number of devices or processes.
"""

from __future__ import annotations

from experiments import attack
from experiments.config import cli_main, parse_config
from experiments.configs import cifar_autoattack as config_module


def get_run(argv=None) -> attack.AttackRun:
    """The run's config: the config module's variant with the command line's overrides."""
    return parse_config(
        config_module, argv, "python -m experiments.cifar_autoattack", __doc__.splitlines()[0],
        arg_flags=("norm",),
    )  # fmt: skip


@cli_main
def main(argv=None, after_batch=None) -> dict:
    return attack.run_single(get_run(argv), after_batch)


if __name__ == "__main__":
    main()
