"""benchmarks/diffattack_memory.py at --tiny size (a 32-channel two-level DDPM UNet, a WRN-10-1,
batch 2, T = 3), so that the script cannot rot: every (T, scheme) row is in its JSON with
XLA's memory analysis, and storing every step's activations (`naive`) needs more working memory
than storing the states only (`segment-wise`), a property of the schemes.

The script runs in a subprocess: importing benchmarks.common sets EQX_ON_ERROR=nan in the
importing process, which other tests must not inherit. No timing is asserted. Three compiles
take 25-40 s on the shared 2-core CPU, hence `slow`.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_tiny_run_reports_every_row(tmp_path):
    out = tmp_path / "diffattack_memory.json"
    cmd = [sys.executable, "-m", "benchmarks.diffattack_memory", "--tiny", "--batch", "2",
           "--steps", "3", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())

    assert "--tiny" in d["command"] and d["environment"]["jax"]
    assert d["state_bytes"] == 2 * 32 * 32 * 3 * 4
    assert d["unet_step_residual_bytes"] > d["state_bytes"] > 0
    assert _positive(d["classifier_residual_bytes"])
    rows = {(r["n_steps"], r["scheme"]): r for r in d["results"]}
    assert set(rows) == {(3, s) for s in ("exact", "segment-wise", "naive")}
    assert d["skipped"] == []
    for (n, scheme), r in rows.items():
        m = r["xla_memory"]
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            assert _positive(m[k]), (k, r)
        assert m["output_size_in_bytes"] == d["state_bytes"]  # the input gradient
        assert r["total_bytes"] >= m["argument_size_in_bytes"] + m["temp_size_in_bytes"] - m.get(
            "alias_size_in_bytes", 0
        )
        assert r["stored_states"] == (n if scheme != "exact" else 2)
        assert r["paper_gb"] is None  # the paper has no T = 3
    temp = {k: r["xla_memory"]["temp_size_in_bytes"] for k, r in rows.items()}
    assert temp[3, "segment-wise"] < temp[3, "naive"]
    for scheme in ("exact", "segment-wise", "naive"):
        assert f"| 3 | {scheme} |" in d["table"]
