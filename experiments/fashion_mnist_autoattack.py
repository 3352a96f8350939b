"""DiffPure on Fashion-MNIST, end to end and offline: the project's embedded default.

    python -m experiments.fashion_mnist_autoattack      # quick comparison, <= 10 min on 2 CPU cores

compares, under the same Linf eps = 0.1 AutoAttack:
    undefended    the standard WRN-16-1, AutoAttack `standard`
    adv-trained   the same WRN-16-1 trained with PGD (Madry et al.), AutoAttack `standard`
    diffpure      the standard WRN-16-1 behind DiffPure (t* = 0.1), AutoAttack `--version`
                  (default `rand`) through the `--grad` gradient (default `adjoint`, the paper's)
and prints one table, each row with its protocol. The settings are the config
`experiments/configs/fashion_mnist_autoattack.py`; `--help` shows every default. `--config full`
is the full protocol (512 images, dt = 1e-3, EOT 20, 100 iterations, 5000 Square queries), and
the other studies of the results page are config words too (`--config exact`, `--config sweep`,
...). Every row is resumable: each has its own workdir `--workdir/<row>-<hash of its settings>`,
and a rerun with the same settings continues.
"""

from __future__ import annotations

import os

from experiments import attack
from experiments.config import cli_main, parse_config, run_dir
from experiments.configs import fashion_mnist_autoattack as config_module


def get_study(argv=None) -> config_module.FashionMnistStudy:
    return parse_config(
        config_module, argv, "python -m experiments.fashion_mnist_autoattack",
        __doc__.splitlines()[0], arg_flags=("norm",),
    )  # fmt: skip


def describe(run: attack.AttackRun) -> tuple[str, str]:
    """(model, 'attack, gradient') columns of a row."""
    classifier = os.path.basename(os.path.normpath(run.classifier))  # e.g. fmnist-wrn-16-1-pgd
    if run.defense == "none":
        return classifier, "StAdv" if run.attack == "stadv" else f"AutoAttack {run.version}"
    name = {
        "autoattack": f"AutoAttack {run.version}",
        "pgd-eot": "PGD-EOT",
        "pgd-eot-final": "PGD-EOT (final iterate)",
        "bpda-eot": "BPDA+EOT",
        "stadv": "StAdv",
        "diffattack": f"DiffAttack (AutoAttack {run.version} + L_dev)",
        "diffhammer": f"DiffHammer (N = {run.n_eval})",
    }
    eot = f", EOT {run.eot}" if run.eot and run.attack != "bpda-eot" else ""
    if run.n_iter:
        eot += f", {run.n_iter} iter."
    if run.attack == "stadv" and not run.eot:
        eot = ", EOT 20"  # the attack's own
    model = f"DiffPure (t*={run.t_star}, dt={run.dt:g}) + {classifier}"
    return model, f"{name[run.attack]}{eot}, {run.grad}"


def comparison_table(rows: list[tuple[str, attack.AttackRun, dict]]) -> str:
    lines = [
        "| row | model | attack, gradient | protocol | examples | clean (%) | robust (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, run, summary in rows:
        model, attack_name = describe(run)
        for protocol in run.protocols:  # in the order the run names them
            robust = summary["robust_accuracy"][protocol]
            lines.append(
                f"| {row} | {model} | {attack_name} | {protocol} | {summary['n_examples']} | "
                f"{summary['clean_accuracy']:.1f} | {robust:.1f} |"
            )
    return "\n".join(lines) + "\n"


def reading(rows: list[tuple[str, attack.AttackRun, dict]]) -> str:
    """The line under the table: what its DiffPure rows say, and their sampling error."""
    robust = {row: summary["robust_accuracy"] for row, _, summary in rows}
    said = []
    if "diffpure" in robust:
        grad = dict((r, run) for r, run, _ in rows)["diffpure"].grad
        said.append(f"{robust['diffpure']['one_draw']:.1f}% through the {grad} gradient")
    if "diffpure-exact" in robust:
        said.append(f"{robust['diffpure-exact']['one_draw']:.1f}% through the exact gradient")
    if "diffpure-final" in robust:
        run = dict((r, run) for r, run, _ in rows)["diffpure-final"]
        final = [f"{robust['diffpure-final'][p]:.1f}% {p.replace('_', '-')}" for p in run.protocols]
        said.append(", ".join(final) + " at the final iterate of exact-gradient PGD-EOT")
    n = min(summary["n_examples"] for *_, summary in rows)
    line = f"Reading: with {n} images a robust accuracy has a standard error of up to "
    line += f"{50 / n**0.5:.0f} points."
    if said:
        line = (
            "Reading: DiffPure's robust accuracy is " + "; ".join(said) + ". The attack's "
            "gradient and the protocol decide the number as much as the defense does; with "
            f"{n} images each has a standard error of up to {50 / n**0.5:.0f} points."
        )
    return line + "\n"


@cli_main
def main(argv=None, after_batch=None) -> str:
    study = get_study(argv)
    rows = [
        (row, run, run_dir(study.workdir, row, run)) for row, run in config_module.study_rows(study)
    ]
    attack.check_inputs([(run, workdir) for _, run, workdir in rows])
    attack.initialize(study)
    data = attack.load_data(study)
    done = []
    for row, run, workdir in rows:
        summary = attack.evaluate(run, workdir, data, after_batch)
        done.append((row, run, summary))
    threat = f"{study.norm} eps = {study.eps:g}"
    table = f"Fashion-MNIST test subset (data seed {study.data_seed}), {threat}\n\n"
    table += comparison_table(done) + "\n" + reading(done)
    print(table)
    print(f"per-example records and summaries: {study.workdir}/<row>-<settings hash>/")
    return table


if __name__ == "__main__":
    main()
