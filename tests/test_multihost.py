"""Two processes on localhost (jax.distributed, gloo on CPU) run the evaluation runner into one
workdir; the merged result equals a single-process run's, byte for byte.

Each worker (tests/multihost_worker.py) has 2 CPU devices, so its batches of 3 are padded to 4
(the last batch of 1 to 2); the reference is the same worker as one process with one CPU device,
unpadded. All run on CPU (JAX_PLATFORMS=cpu), also on a machine with a GPU.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import problem

from diffpure_jax.runner import read_records, run_evaluation
from experiments import cifar_autoattack
from experiments.config import identity

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _files(workdir):
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            out[os.path.relpath(os.path.join(root, name), workdir)] = os.path.join(root, name)
    return out


def _cpu_env(n_devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    # (processes, process id, devices per process, workdir): the 2-process run and the reference,
    # one process with one device, all started at once.
    runs = [(2, 0, 2, "multi"), (2, 1, 2, "multi"), (1, 0, 1, "single")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                str(port),
                str(n),
                str(i),
                str(tmp_path / d),
                str(tmp_path / f"{k}"),
            ],
            env=_cpu_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, (n, i, devices, d) in enumerate(runs)
    ]
    deadline = time.monotonic() + TIMEOUT_S  # one deadline for all: a hang fails, never blocks
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-5000:]
    reports = [json.loads((tmp_path / f"{k}").read_text()) for k in range(3)]
    assert [r["process_index"] for r in reports] == [0, 1, 0]
    assert [(r["process_count"], r["local_devices"]) for r in reports] == [(2, 2), (2, 2), (1, 1)]
    assert [r["batches"] for r in reports] == [[0, 2], [1, 3], [0, 1, 2, 3]]
    assert reports[0]["gathered"] == reports[1]["gathered"] == [[0, 2], [1, 2]]
    assert reports[0]["summary"] == reports[1]["summary"] == reports[2]["summary"]
    multi_files, single_files = _files(tmp_path / "multi"), _files(tmp_path / "single")
    # One merged records.jsonl, no per-process files left, the same adv/ batches.
    assert sorted(multi_files) == sorted(single_files)
    assert len(read_records(str(tmp_path / "single"))) == 10
    for name in ("records.jsonl", "summary.json", "summary.md", "run_config.json"):
        with open(multi_files[name]) as a, open(single_files[name]) as b:
            assert a.read() == b.read(), name
    for name in multi_files:
        if name.endswith(".npz"):
            a, b = np.load(multi_files[name]), np.load(single_files[name])
            for k in ("index", "x_adv", "y"):
                np.testing.assert_array_equal(a[k], b[k])


def test_resume_from_an_interrupted_multiprocess_run(tmp_path):
    """Per-process records files (one with a torn line) from a killed 2-process run: a single
    process resumes, runs only what is missing and merges into one records.jsonl."""
    evaluation, model, x, y, index = problem()
    ref = tmp_path / "ref"
    run_evaluation(evaluation, model, x, y, index, str(ref), progress=False)
    lines = (ref / "records.jsonl").read_text().splitlines(keepends=True)
    batch_of = [json.loads(line)["batch"] for line in lines]
    part = tmp_path / "part"
    part.mkdir()
    (part / "run_config.json").write_text((ref / "run_config.json").read_text())
    # Process 0 finished batch 0 (not 2); process 1 finished batch 1 and was killed in batch 3.
    (part / "records.p0.jsonl").write_text(
        "".join(ln for ln, b in zip(lines, batch_of, strict=True) if b == 0)
    )
    p1 = (
        "".join(ln for ln, b in zip(lines, batch_of, strict=True) if b == 1) + '{"index": 209, "lab'
    )
    (part / "records.p1.jsonl").write_text(p1)
    assert len(read_records(str(part))) == 6
    run_evaluation(evaluation, model, x, y, index, str(part), progress=False)
    assert sorted(os.listdir(part)) == sorted(os.listdir(ref))
    assert sorted(os.listdir(part / "adv")) == ["batch_00002.npz", "batch_00003.npz"]
    assert (part / "records.jsonl").read_text() == (ref / "records.jsonl").read_text()
    assert (part / "summary.json").read_text() == (ref / "summary.json").read_text()


def test_cli_process_flags_do_not_change_the_run_identity():
    argv = ["--coordinator", "host0:1234", "--num-processes", "4", "--process-id", "2"]
    run = cifar_autoattack.get_run(argv)
    assert (run.coordinator, run.num_processes, run.process_id) == ("host0:1234", 4, 2)
    plain = cifar_autoattack.get_run([])
    # A run may resume with another number of processes: these flags are not in run_config.json.
    assert not {"coordinator", "num_processes", "process_id"} & set(identity(run))
    assert identity(run) == identity(plain)
