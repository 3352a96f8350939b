"""benchmarks/headline.py (the table at the top of benchmarks/README.md) at --tiny size, so that
it cannot rot: every case is there with finite positive numbers, and the FLOP counts and
multiples hang together. Run in a subprocess: importing benchmarks.common sets EQX_ON_ERROR=nan
in the importing process, which other tests must not inherit. No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _positive(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_tiny_headline_reports_every_case(tmp_path):
    out = tmp_path / "headline.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cmd = [sys.executable, "-m", "benchmarks.headline", "--tiny", "--batch", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert "--tiny" in d["command"] and _positive(d["matmul"]["flops_per_s"])
    (group,) = d["groups"]
    rows = {r["case"]: r for r in group["rows"]}
    assert set(rows) == {"net-forward", "net-vjp", "forward", "exact", "exact-sqrt", "adjoint",
                         "apgd"}  # fmt: skip
    for r in rows.values():
        for k in ("steady_s", "flops", "flops_per_s", "utilisation", "need_bytes"):
            assert _positive(r[k]), (r["case"], k, r[k])
        assert r["finite"]
    n, f = group["n_steps"], group["flops_per_call"]
    assert rows["forward"]["flops"] == n * f["net"] and rows["forward"]["x_forward"] == 1.0
    # Every state kept: no forward step recomputed; the sqrt(2n) schedule recomputes some.
    assert rows["exact"]["recompute_forward_steps"] == 0 and rows["exact"]["flops"] == n * (
        f["net"] + f["net_vjp"]
    )
    assert rows["exact-sqrt"]["recompute_forward_steps"] > 0
    assert rows["adjoint"]["flops"] == rows["exact"]["flops"]
    # One APGD iteration: the exact gradient of batch / eot images x eot draws, plus the classifier.
    assert rows["apgd"]["images"] * rows["apgd"]["eot"] == rows["apgd"]["batch"] == 4
    assert rows["apgd"]["flops"] == rows["exact"]["flops"] + f["classifier_vjp"]
    assert len(rows["apgd"]["runs"]) == 2  # n_iter = 2 and 3
    assert "| one APGD-EOT iteration" in d["table"]


@pytest.mark.slow
def test_tiny_interleaved_ratio(tmp_path):
    out = tmp_path / "interleaved.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cmd = [sys.executable, "-m", "benchmarks.headline", "--tiny", "--batch", "4", "--interleaved",
           "--rounds", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["interleaved"]
    assert [len(r["runs_s"][c]) for c in ("forward", "exact")] == [2, 2]
    assert r["x_forward"] == r["min_s"]["exact"] / r["min_s"]["forward"] and r["x_forward"] > 1
