"""Data parallelism over devices (diffpure_jax.sharding): results equal the 1-device ones.

The multi-device part runs tests/sharding_worker.py in a subprocess with 8 CPU devices (this
pytest process has already started JAX with one). Measured there (jax 0.10.2, CPU): purification
and its exact gradient for a batch of 5 padded to 8 over 8 devices, and the runner end to end
(PGD-EOT, batches of 5 padded to 8), are bit-identical to the unpadded 1-device results.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from diffpure_jax import sharding

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_worker.py")


def test_pad_unpad_and_indices():
    x = np.arange(10.0).reshape(5, 2)
    padded = sharding.pad_to_multiple({"x": x, "y": np.arange(5)}, 4)
    assert padded["x"].shape == (8, 2) and isinstance(padded["x"], np.ndarray)
    np.testing.assert_array_equal(padded["x"][5:], np.repeat(x[:1], 3, 0))
    np.testing.assert_array_equal(sharding.unpad(padded, 5)["x"], x)
    assert sharding.pad_to_multiple(jnp.ones((8, 3)), 4).shape == (8, 3)
    assert sharding.pad_to_multiple(jnp.ones((3, 1)), 8).shape == (8, 1)
    np.testing.assert_array_equal(sharding.pad_index(np.array([7, 3, 9]), 4), [7, 3, 9, -1])
    np.testing.assert_array_equal(sharding.pad_index(np.arange(2), 5), [0, 1, -1, -2, -3])
    with pytest.raises(ValueError, match="leading size"):
        sharding.pad_to_multiple((np.ones(3), np.ones(4)), 2)


def test_mesh_and_processes_single_process():
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 1
    assert str(mesh.axis_types[0]).endswith("Auto")
    out = sharding.run_sharded(lambda b, s: b * s, jnp.arange(3.0), jnp.asarray(2.0))
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    assert sharding.initialize_distributed() is False  # no coordinator: a single process
    assert sharding.process_batches(5) == [0, 1, 2, 3, 4]
    assert sharding.process_batches(7, process_index=1, process_count=3) == [1, 4]
    assert sharding.gather(np.array([1, 2])).tolist() == [[1, 2]]


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["n_devices"] == 8
    # purify (batch 5 padded to 8) and its exact gradient: bit-identical to unsharded.
    for name in ("purify", "grad"):
        assert report[name]["equal"], (name, report[name])
    # Certification counts (denoised smoothing, 5 images padded to 8): equal to 1 device.
    assert report["certify_counts"]["equal"] and report["certify_counts_total"] == 5 * 40
    # Two different batches of the same padded shape: one trace.
    assert report["purify_traces_two_batches"] == 1
    # The runner: no retrace after the first batch; records, summary and adv/ bit-identical.
    for name in ("runner_traces_mesh1", "runner_traces_mesh8"):
        counts = report[name]
        assert counts["0"] > 0 and counts["1"] == counts["0"], (name, counts)
    assert report["runner_records_equal"] and report["runner_summary_equal"]
    assert report["runner_adv"]["equal"], report["runner_adv"]
    assert report["runner_adv_rows"] == 5 and report["runner_n_records"] == 10
