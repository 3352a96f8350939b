"""The embedded default, `python -m experiments.fashion_mnist_autoattack`, at its smallest size,
on the shipped checkpoints and the real Fashion-MNIST test set; and the shipped models' quality."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpure_jax import load_classifier, load_purifier, load_score_model
from diffpure_jax.data import fashion_mnist_test
from diffpure_jax.purified import load_purified
from diffpure_jax.sample import sample
from experiments import fashion_mnist_autoattack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints")


@pytest.fixture(scope="module")
def test_subset():
    return fashion_mnist_test(16, seed=0)  # fails with the apt-get hint if the data is missing


@pytest.mark.slow
def test_embedded_default_runs_at_its_smallest_size(tmp_path, capsys, test_subset):
    argv = [
        "--n-examples", "2", "--batch-size", "2", "--n-iter", "2", "--eot", "1",
        "--n-queries", "5", "--dt", "0.05", "--no-progress", "--workdir", str(tmp_path),
        "--classifier", os.path.join(CKPT, "fmnist-wrn-16-1"),
        "--adv-classifier", os.path.join(CKPT, "fmnist-wrn-16-1-pgd"),
        "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"),
    ]  # fmt: skip
    table = fashion_mnist_autoattack.main(argv)
    out = capsys.readouterr().out
    assert table in out
    for row in ("undefended", "adv-trained", "diffpure", "diffpure-final"):
        assert f"| {row} |" in table
    assert "| worst_of_10 |" in table and "| majority_of_10 |" in table
    assert "Reading: DiffPure's robust accuracy is" in table
    assert len(os.listdir(tmp_path)) == 4  # one resumable workdir per row
    again = fashion_mnist_autoattack.main(argv)  # every row resumes from its records
    assert again == table

    # The report's figures read these workdirs: the example grid and the t* plot.
    from experiments.reports import grid as grid_report
    from experiments.reports import sweep as sweep_report

    (diffpure,) = [d for d in os.listdir(tmp_path) if d.startswith("diffpure-final-")]
    workdir = os.path.join(tmp_path, diffpure)
    grid, sweep = tmp_path / "grid.png", tmp_path / "sweep.png"
    grid_report.main(["--workdir", workdir, "--n", "2", "--out", str(grid)])
    sweep_report.main(["--workdirs", workdir, "--out", str(sweep)])
    assert grid.read_bytes()[:4] == sweep.read_bytes()[:4] == b"\x89PNG"


def test_shipped_classifier_is_accurate_on_a_test_subset(test_subset):
    x, y, _ = test_subset
    classifier = load_classifier(os.path.join(CKPT, "fmnist-wrn-16-1"))
    assert classifier(jnp.asarray(x)).shape == (16, 10)
    assert np.mean(np.asarray(classifier(jnp.asarray(x)).argmax(-1)) == y) >= 0.8


def test_purified_images_stay_close_to_the_clean_ones(test_subset):
    x, _, index = test_subset
    purifier = load_purifier(os.path.join(CKPT, "fmnist-ncsnpp-small"), t_star=0.1, dt=0.02)
    out = np.asarray(purifier(jnp.asarray(x[:4]), jax.random.key(0), jnp.asarray(index[:4])))
    assert out.shape == (4, 28, 28, 1)
    # A trained model denoises: far closer to x than the diffused input (std ~0.16 in [0, 1]).
    assert np.sqrt(np.mean((out - x[:4]) ** 2)) < 0.12


def test_samples_have_the_image_shape_and_range():
    score = load_score_model(os.path.join(CKPT, "fmnist-ncsnpp-small"))
    x = sample(score, jax.random.key(0), 2, n_steps=5)
    assert x.shape == (2, 28, 28, 1)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_accuracy_report_scores_every_classifier_on_the_same_purified_images(tmp_path):
    from experiments.reports import accuracy as report

    out = tmp_path / "accuracy.json"
    classifiers = [os.path.join(CKPT, "fmnist-wrn-16-1"), os.path.join(CKPT, "fmnist-wrn-16-1-pgd")]
    result = report.main(
        ["--n", "6", "--dt", "0.05", "--batch-size", "4", "--out", str(out),
         "--no-progress", "--purified-root", str(tmp_path / "purified"),
         "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"), "--classifier", *classifiers]
    )  # fmt: skip
    assert json.loads(out.read_text()) == result
    x, y, _ = fashion_mnist_test(6, seed=0)
    for path in classifiers:
        clean = result["classifiers"][path]["clean"]
        expected = 100.0 * np.mean(
            np.asarray(load_classifier(path)(jnp.asarray(x)).argmax(-1)) == y
        )
        assert clean["accuracy"] == pytest.approx(expected)
        for scores in (clean, result["classifiers"][path]["purified_t0.1"]):
            counts = np.array(list(scores["per_class"].values()))
            assert counts[:, 0].sum() == 6 and (counts[:, 1] <= counts[:, 0]).all()
            assert scores["accuracy"] == pytest.approx(100.0 * counts[:, 1].sum() / 6)
    # The purified images were kept: a rerun reads them back and gives the same numbers.
    assert len(list((tmp_path / "purified").glob("*/chunk_*.npz"))) == 2
    assert report.main(
        ["--n", "6", "--dt", "0.05", "--batch-size", "4", "--no-progress",
         "--purified-root", str(tmp_path / "purified"),
         "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"), "--classifier", *classifiers]
    ) == result  # fmt: skip


def test_reverse_draws_report_votes_over_reverse_solves_of_one_diffusion(tmp_path):
    from experiments.reports import accuracy as accuracy_report
    from experiments.reports import reverse_draws

    classifier = os.path.join(CKPT, "fmnist-wrn-16-1")
    common = ["--n", "4", "--dt", "0.05", "--batch-size", "4", "--no-progress",
              "--score", os.path.join(CKPT, "fmnist-ncsnpp-small"), "--classifier", classifier,
              "--purified-root", str(tmp_path / "purified")]  # fmt: skip
    accuracy = accuracy_report.main(common)
    result = reverse_draws.main(["--draws", "3", *common])
    scores = result["classifiers"][classifier]
    # Draw 0 is the accuracy report's purification (its kept images are read back).
    first = accuracy["classifiers"][classifier]["purified_t0.1"]
    assert scores["one_draw_accuracy_per_draw"][0] == first["accuracy"]
    assert scores["one_draw_accuracy_mean"] == pytest.approx(
        np.mean(scores["one_draw_accuracy_per_draw"])
    )
    dirs = sorted(d.name for d in (tmp_path / "purified").iterdir())
    assert len(dirs) == 3 and dirs[1].endswith("-reverse1") and dirs[2].endswith("-reverse2")
    draws = [load_purified(str(tmp_path / "purified" / d))[1] for d in dirs]
    assert min(np.abs(draws[0] - d).max() for d in draws[1:]) > 1e-2  # other reverse noise
    counts = np.array(list(scores["majority_vote"]["per_class"].values()))
    assert counts[:, 0].sum() == 4


def test_diffused_report_scores_classifiers_on_the_start_of_the_reverse_solve(tmp_path):
    from experiments.reports import diffused as report

    path = os.path.join(CKPT, "fmnist-wrn-16-1")
    out = tmp_path / "diffused.json"
    result = report.main(["--n", "8", "--classifier", path, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    x, y, _ = fashion_mnist_test(8, seed=0)
    probs = np.asarray(jax.nn.softmax(load_classifier(path)(jnp.asarray(x)), -1))
    clean = result["classifiers"][path]["clean"]
    assert clean["accuracy"] == pytest.approx(100.0 * np.mean(probs.argmax(-1) == y))
    assert clean["mean_true_class_probability"] == pytest.approx(
        100.0 * np.mean(probs[np.arange(8), y]), rel=1e-5
    )
    diffused = result["classifiers"][path]["diffused_t0.1"]
    assert 0.0 <= diffused["mean_true_class_probability"] <= 100.0
    assert diffused["mean_true_class_probability"] != clean["mean_true_class_probability"]
