"""benchmarks/accelerator.py (the prepared GPU benchmark) at --tiny size on the CPU, so that it
cannot rot before a GPU session runs it: every section of its JSON is there, with finite positive
numbers where they must be, and the sharded program is compiled for 8 devices.

Both tests run the script in subprocesses: importing benchmarks.common sets EQX_ON_ERROR=nan in
the importing process (and in every subprocess it starts), which other tests must not inherit.
No timing is asserted; the budget is set out of reach so that no case is skipped.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _positive(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_budget_planner_and_fit():
    code = """
from benchmarks.accelerator import estimates, fit_max_batch, plan_case
assert plan_case(100, 10, 30, 20, "exact") == "run"
assert plan_case(100, 10, 30, 40, "exact") == "compile"
assert plan_case(100, 10, 30, 40, "forward") == "skip"
assert plan_case(100, 80, 30, 0, "exact") == "skip"
rows = [{"mode": "exact", "score_dtype": "float32", "batch": 16, "compile_s": 50.0,
         "steady_s": 2.0}]
assert estimates(rows, "exact", "float32", 64) == (50.0, 8.0)
assert estimates(rows, "exact", "bfloat16", 32) == (50.0, 4.0)
assert estimates(rows, "forward", "float32", 16) == (45.0, 0.0)
pts = [{"batch": 1, "need_bytes": 3e9}, {"batch": 3, "need_bytes": 7e9}]
fit = fit_max_batch(pts, {"80 GB": 80e9})
assert abs(fit["bytes_per_image"] - 2e9) < 1 and fit["max_batch"] == {"80 GB": 39}, fit
assert "error" in fit_max_batch(pts[:1], {"80 GB": 80e9})
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_tiny_run_reports_every_section(tmp_path):
    out = tmp_path / "accelerator.json"
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--tiny", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--budget-s", "100000"], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())

    assert d["platform"] == "cpu" and d["environment"]["jax"] and "--tiny" in d["command"]
    for dtype in ("float32", "bfloat16"):
        assert _positive(d["matmul"][dtype]["flops_per_s"])

    flops = d["flops"]
    for k in ("net_per_image", "net_vjp_per_image", "classifier_vjp_per_image"):
        assert _positive(flops[k]), k
    assert flops["exact_per_image"] > flops["forward_per_image"] > 0
    assert flops["check"]["loop_body_counted_once"]

    rows = d["throughput"]
    cases = {(r["score_dtype"], r["mode"], r["batch"]) for r in rows}
    assert cases == {(t, m, b) for t in ("float32", "bfloat16") for m in ("forward", "exact")
                     for b in (2, 4)}  # fmt: skip
    assert d["skipped"] == []
    for r in rows:
        assert r["status"] == "ran" and r["finite"], r
        for k in ("compile_s", "steady_s", "images_per_s", "flops", "flops_per_s", "utilisation"):
            assert _positive(r[k]), (k, r)
        for k in ("temp_size_in_bytes", "argument_size_in_bytes"):
            assert _positive(r["xla_memory"][k]), (k, r)
        assert r["peak_bytes_in_use"] is None  # the CPU reports no allocator statistics

    aa = d["autoattack"]
    assert aa["workload"]["exact_gradients"] == 512 * 2 * 100 * 20
    assert aa["method"].startswith("derived")
    assert math.isclose(aa["official"]["gpu_hours"], 4 * 118755 / 3600)
    for dtype in ("float32", "bfloat16"):
        a = aa["by_dtype"][dtype]
        for k in ("s_per_exact_gradient_per_image", "device_hours", "total_flops"):
            assert _positive(a[k]), (k, a)
        assert math.isclose(a["s_per_apgd_iteration_per_image"],
                            20 * a["s_per_exact_gradient_per_image"])  # fmt: skip

    sizing = d["sizing"]["by_dtype"]["float32"]
    assert [p["source"] for p in sizing["points"]] == ["part 1 compile", "compile only"]
    assert all(_positive(p["need_bytes"]) for p in sizing["points"])
    fit = sizing["fit"]
    assert _positive(fit["bytes_per_image"])
    small, large = fit["max_batch"]["80 GB"], fit["max_batch"]["141 GB"]
    assert isinstance(small, int) and 0 < small < large

    sharded = d["sharded"]
    assert sharded["n_devices"] == 8 and sharded["per_device_batch"] == 2, sharded
    for k in ("temp_size_in_bytes", "argument_size_in_bytes"):
        assert _positive(sharded["per_device_xla_memory"][k]), sharded
    # Split, not replicated: a device holds about what one device needs for its share.
    assert 0.5 < sharded["per_device_over_one_device"] < 2.0, sharded
    assert "| dtype |" in d["tables"]
