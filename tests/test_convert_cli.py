"""The converter command line, end to end on the reference small checkpoints."""

import subprocess
import sys

import jax
import numpy as np
from helpers import max_rel_err, nhwc

from diffpure_jax import load_classifier, load_score_model
from diffpure_jax.convert.__main__ import main


def test_cli_converts_score_model_and_classifier(reference_dir, tmp_path, score_io):
    out = tmp_path / "score"
    rc = main(
        ["score-sde", str(reference_dir / "score_sde_cifar10_small.pth"), str(out)]
        + ["--arch", "nf=16", "num_res_blocks=2"]
    )
    assert rc == 0
    score = load_score_model(str(out))
    t = jax.numpy.asarray(score_io["t"])
    ours = np.asarray(score(nhwc(score_io["x"]), t)).transpose(0, 3, 1, 2)
    assert max_rel_err(ours, score_io["score"]) <= 1e-5

    out = tmp_path / "wrn"
    src = reference_dir / "wrn28_10_cifar10_standard_small.pth"
    assert (
        main(["robustbench-wrn", str(src), str(out), "--arch", "depth=16", "widen_factor=2"]) == 0
    )
    io = np.load(reference_dir / "wrn28_10_cifar10_standard_small_io.npz")
    assert max_rel_err(load_classifier(str(out))(nhwc(io["x"])), io["logits"]) <= 1e-5


def test_cli_reports_mismatch_without_traceback(reference_dir, tmp_path):
    # the sizes are read from the file, but an explicit option wins: a wrong one is refused
    src = reference_dir / "score_sde_cifar10_small.pth"
    proc = subprocess.run(
        [sys.executable, "-m", "diffpure_jax.convert", "score-sde", str(src), str(tmp_path / "o")]
        + ["--arch", "num_res_blocks=3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: the checkpoint") and "missing keys" in proc.stderr
    assert "Traceback" not in proc.stderr
