"""Evaluation protocols and the resumable runner."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Killed, NoisyModel, kill_at, synthetic_data, trained_mlp

from diffpure_jax.attacks.base import Threat
from diffpure_jax.attacks.suites import pgd_suite
from diffpure_jax.protocols import parse_protocols, protocol_scores
from diffpure_jax.runner import Evaluation, read_records, run_evaluation


def test_protocol_scores():
    y = jnp.array([0, 1, 2])
    preds = jnp.array([[0, 1, 0], [0, 2, 0], [1, 1, 0]])  # 3 draws x 3 examples
    np.testing.assert_array_equal(protocol_scores(preds, y, "worst"), [False, False, False])
    np.testing.assert_allclose(protocol_scores(preds, y, "average"), [2 / 3, 2 / 3, 0])
    np.testing.assert_array_equal(protocol_scores(preds, y, "majority"), [True, True, False])
    assert parse_protocols(["one_draw", "worst_of_10", "majority_of_3"]) == [
        ("one_draw", 1),
        ("worst", 10),
        ("majority", 3),
    ]
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_protocols(["best_of_3"])


def _evaluation(**kw):
    threat = Threat("Linf", 0.06)
    attack = pgd_suite(threat, n_iter=5, n_eot=2)
    return Evaluation(
        attack=attack,
        threat=threat,
        protocols=("one_draw", "worst_of_4", "majority_of_4", "average_of_4"),
        batch_size=4,
        seed=3,
        description={"test": 1, **kw},
    )


def test_resumed_run_equals_uninterrupted(tmp_path):
    x, y = synthetic_data(10, seed=7)
    x, y = np.asarray(x), np.asarray(y)
    index = np.arange(100, 110)
    model = NoisyModel(trained_mlp())
    full = run_evaluation(_evaluation(), model, x, y, index, str(tmp_path / "full"), False)

    with pytest.raises(Killed):
        run_evaluation(_evaluation(), model, x, y, index, str(tmp_path / "part"), False, kill_at(1))
    assert len(read_records(str(tmp_path / "part"))) == 8  # batches 0 and 1 are durable
    # A torn line from a kill mid-write is ignored and repaired.
    with open(tmp_path / "part" / "records.jsonl", "a") as f:
        f.write('{"index": 108, "lab')
    resumed = run_evaluation(_evaluation(), model, x, y, index, str(tmp_path / "part"), False)

    def by_index(d):
        return sorted(read_records(str(tmp_path / d)), key=lambda r: r["index"])

    assert by_index("full") == by_index("part")
    assert len(by_index("full")) == 10
    assert full == resumed
    assert 0 < full["robust_accuracy"]["worst_of_4"] <= full["robust_accuracy"]["average_of_4"]
    assert (tmp_path / "full" / "summary.md").read_text().count("|") > 10
    adv = np.load(tmp_path / "full" / "adv" / "batch_00000.npz")
    assert np.abs(adv["x_adv"] - x[:4]).max() <= 0.06 + 1e-6


def test_rerun_with_other_settings_refuses_and_keeps_results(tmp_path):
    x, y = synthetic_data(4, seed=7)
    model = NoisyModel(trained_mlp())
    args = (model, np.asarray(x), np.asarray(y), np.arange(4), str(tmp_path))
    run_evaluation(_evaluation(), *args, False)
    before = (tmp_path / "records.jsonl").read_text()
    with pytest.raises(ValueError, match="different settings"):
        run_evaluation(_evaluation(eps="other"), *args, False)
    assert (tmp_path / "records.jsonl").read_text() == before
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"test": 1}


def test_timings_per_batch_and_the_cost_report(tmp_path, capsys):
    """Each batch's wall time goes to timings.jsonl (not the records); a resumed sitting's first
    batch is marked, and the cost per example leaves the first batches out."""
    from helpers import problem

    from diffpure_jax.runner import read_timings, seconds_per_example
    from experiments.reports import attack_cost

    evaluation, model, x, y, index = problem(n=9, batch_size=3)
    workdir = str(tmp_path / "run")
    with pytest.raises(Killed):
        run_evaluation(evaluation, model, x, y, index, workdir, False, kill_at(1))
    run_evaluation(evaluation, model, x, y, index, workdir, False)
    timings = read_timings(workdir)
    assert [(t["batch"], t["first"], t["examples"]) for t in timings] == [
        (0, True, 3), (1, False, 3), (2, True, 3),
    ]  # fmt: skip
    assert all(t["seconds"] > 0 for t in timings)
    assert seconds_per_example(workdir) == pytest.approx(timings[1]["seconds"] / 3)
    assert not any("seconds" in r for r in read_records(workdir))
    rows = attack_cost.main(["--workdirs", workdir])
    assert rows[0]["robust_accuracy"].keys() == {"one_draw", "majority_of_3"}
    assert "| majority_of_3 (%) | one_draw (%) | s / example |" in capsys.readouterr().out
