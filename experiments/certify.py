"""Certified L2 robustness by diffusion denoised smoothing (Carlini et al., ICLR 2023), resumable.

    python -m experiments.certify                                  # CIFAR-10, the paper's protocol
    python -m experiments.certify --config cifar10,sigma0.5        # sigma 0.25, 0.5 or 1.0
    python -m experiments.certify --config fmnist                  # the shipped models, CPU size
    python -m experiments.certify --config fmnist,full,sigma0.5    # n = 100,000 on 500 images
    python -m experiments.certify --config imagenet --data-dir DIR
    python -m experiments.certify --score none                     # plain randomized smoothing
    python -m experiments.certify --config fmnist --n-reverse 4    # DensePure-style majority vote

The settings are the config `experiments/configs/certify.py` (`--help` shows every default);
every flag overrides one of its fields. Each test image gets Cohen et al.'s CERTIFY: n0
selection samples of the base classifier f(denoise(x + sigma eps)) pick the top class, n fresh
samples bound its probability pA from below (Clopper-Pearson at alpha), and the smoothed
classifier is certified at L2 radius sigma * Phi^-1(pA_lower), or abstains (`diffpure_jax.
certify`). A run goes to `--workdir/certify-<hash of its settings>` (records.jsonl, one line per
image, summary.json and summary.md); killed and rerun with the same settings it continues where
it stopped, and a workdir holding other settings is refused. The table printed at the end has the
certified accuracy at `--radii`, the abstention rate, the smoothed classifier's accuracy and the
noise samples counted per second; `python -m experiments.reports.certify_curve` plots the
certified accuracy against the radius from one or more runs.

The images of a batch are split over all local devices; several processes or hosts sharing the
workdir take the flags of `experiments.cifar_autoattack` (`--coordinator`, `--num-processes`,
`--process-id`). The records do not depend on the number of devices, processes, `--batch` or
`--examples-per-batch`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from diffpure_jax import load_classifier, load_purifier, load_score_model
from diffpure_jax.certify import normal_ppf, run_certification, smoothed_classifier
from diffpure_jax.checkpoint import CheckpointError, read_config
from diffpure_jax.load import DDPM_PARAMETERIZATION, check_checkpoint
from diffpure_jax.workdir import RUN_CONFIG
from experiments import attack
from experiments.config import UsageError, cli_main, identity, parse_config, run_dir
from experiments.configs import certify as config_module
from experiments.configs.certify import CertifyRun


def get_run(argv=None) -> CertifyRun:
    """The run's config: the config module's variant with the command line's overrides."""
    return parse_config(
        config_module, argv, "python -m experiments.certify", __doc__.splitlines()[0]
    )


def _shape(path: str, kind: str) -> tuple[int, ...]:
    return tuple(read_config(path, kind)["input_shape"])


def _is_ddpm(score: str) -> bool:
    return read_config(score, "score").get("parameterization") == DDPM_PARAMETERIZATION


def denoiser_shape(run: CertifyRun) -> tuple[int, ...] | None:
    """(H, W, C) of the images the denoiser runs on (None without one)."""
    if run.score is None:
        return None
    h, w, c = _shape(run.score, "score")
    return (h, w, c) if run.input_size is None else (run.input_size, run.input_size, c)


def _show(shape) -> str:
    return "x".join(map(str, shape))


def check_inputs(run: CertifyRun, workdir: str) -> None:
    """Refuse, before any work and listing every problem at once, what would stop the run later:
    a missing checkpoint or data, a classifier and denoiser (or data) of different image sizes,
    DensePure on a DDPM checkpoint, a workdir that is a file or holds a run with other
    settings. Raises UsageError."""
    problems = []
    checkpoints = [(run.classifier, "classifier")] + ([(run.score, "score")] if run.score else [])
    for path, kind in checkpoints:
        try:
            check_checkpoint(path, kind)
        except CheckpointError as e:
            problems.append(str(e))
    data = None
    try:
        data = attack.load_data(dataclasses.replace(run, n_examples=1, data_seed=0))
    except UsageError as e:
        problems.append(str(e))
    if not problems:
        classifier = _shape(run.classifier, "classifier")
        images = tuple(data[0].shape[1:])
        denoised = denoiser_shape(run)
        if denoised is not None and denoised != classifier:
            problems.append(
                f"the classifier {run.classifier} takes {_show(classifier)} images but the "
                f"denoiser {run.score} returns {_show(denoised)}: use models of one image size "
                "(--input-size S runs the denoiser at side S)"
            )
        elif images != classifier:
            label = attack.TEST_SETS[run.dataset].label
            problems.append(
                f"the classifier {run.classifier} takes {_show(classifier)} images, the "
                f"{label} ones are {_show(images)}: pass a {label} classifier"
            )
        if run.n_reverse and _is_ddpm(run.score):
            problems.append(
                f"{run.score} is a DDPM eps network: DensePure's reverse runs (--n-reverse) take "
                "a VP-SDE score model; pass --n-reverse 0 (the one-shot denoiser)"
            )
    parent = os.path.dirname(os.path.normpath(workdir))
    if any(os.path.isfile(d) for d in (workdir, parent)):
        problems.append(f"--workdir {parent!r} is a file; pass a directory")
    else:
        changed = changed_identity(workdir, run)
        if changed:
            problems.append(
                f"{workdir} holds a run with other settings ({', '.join(changed)}); it is kept"
            )
    if problems:
        raise UsageError("\n".join(dict.fromkeys(problems)))


def changed_identity(workdir: str, run: CertifyRun) -> list[str]:
    """The config fields in which the run stored in `workdir` differs from `run` (the stored
    settings also hold the library's description of the denoiser, checked when it runs)."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        stored = json.load(f)
    return sorted(k for k, v in identity(run).items() if stored.get(k) != v)


def load_smoothed(run: CertifyRun):
    """The smoothed classifier of the run's classifier behind its denoiser (`check_inputs`
    first)."""
    classifier = load_classifier(run.classifier)
    if run.score is None:
        return smoothed_classifier(classifier, run.sigma)
    model = load_purifier(run.score) if _is_ddpm(run.score) else load_score_model(run.score)
    if run.input_size is not None:  # the network is convolutional: run it at the data's size
        model = dataclasses.replace(model, image_shape=denoiser_shape(run))
    try:
        return smoothed_classifier(
            classifier, run.sigma, model, clip=run.clip, n_reverse=run.n_reverse,
            n_steps=run.n_steps, score_dtype=run.score_dtype,
        )  # fmt: skip
    except ValueError as e:  # e.g. a sigma beyond the diffusion's end
        raise UsageError(str(e)) from None


def describe(run: CertifyRun) -> str:
    """One line: the smoothed model."""
    classifier = os.path.basename(os.path.normpath(run.classifier))
    if run.score is None:
        return f"randomized smoothing of {classifier}"
    score = os.path.basename(os.path.normpath(run.score))
    if run.n_reverse:
        how = f"DensePure, majority of {run.n_reverse} reverse solves of {run.n_steps} steps"
    else:
        how = "one-shot denoiser"
    return f"{classifier} behind {score} ({how})"


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius n samples can certify: sigma Phi^-1(alpha^(1/n)), all n counted."""
    return sigma * normal_ppf(alpha ** (1.0 / n))


def summary_table(run: CertifyRun, summary: dict) -> str:
    """The run's table: certified accuracy at each radius, abstention, accuracy, throughput."""
    label = attack.TEST_SETS[run.dataset].label
    lines = [
        f"{label} test subset of {summary['n_examples']} images (data seed {run.data_seed}), "
        f"{describe(run)}",
        f"sigma = {run.sigma:g}, n0 = {run.n0}, n = {run.n}, alpha = {run.alpha:g}; the largest "
        f"certifiable radius at this n is {max_radius(run.sigma, run.n, run.alpha):.3f}",
        "",
        "| L2 radius | certified accuracy (%) |",
        "|---|---|",
    ]
    lines += [f"| {r} | {100 * a:.1f} |" for r, a in summary["certified_accuracy"].items()]
    rate = summary.get("noise_samples_per_second")
    lines += [
        "",
        f"abstained: {100 * summary['abstention_rate']:.1f}%; smoothed classifier's accuracy "
        f"(correct, not abstaining): {100 * summary['accuracy']:.1f}%",
        "noise samples per second: "
        + (f"{rate:.0f}" if rate else "n/a")
        + f" ({jax.local_device_count()} {jax.default_backend()} device(s) per process, "
        "compilation left out)",
    ]
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None, after_batch=None) -> dict:
    run = get_run(argv)
    workdir = run_dir(run.workdir, "certify", run)
    check_inputs(run, workdir)
    attack.initialize(run)
    x, y, index = attack.load_data(run)
    smoothed = load_smoothed(run)
    print(
        f"{len(x)} {attack.TEST_SETS[run.dataset].label} test images, {describe(run)}, sigma "
        f"{run.sigma:g}, n0 {run.n0}, n {run.n}; {jax.local_device_count()} device(s) per "
        f"process, process {jax.process_index()} of {jax.process_count()}; workdir {workdir}"
    )
    try:
        summary = run_certification(
            smoothed, x, y, index, workdir, n0=run.n0, n=run.n, alpha=run.alpha,
            batch=run.batch, examples_per_batch=run.examples_per_batch, seed=run.seed,
            radii=run.radii, description=identity(run), progress=run.progress,
            after_batch=after_batch,
        )  # fmt: skip
    except ValueError as e:
        if "holds a run with different settings" not in str(e):
            raise
        raise UsageError(str(e)) from None  # the library's part of the settings changed
    print(summary_table(run, summary))
    print(f"per-example records: {os.path.join(workdir, 'records.jsonl')}")
    return summary


if __name__ == "__main__":
    main()
