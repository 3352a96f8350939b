"""Run by tests/test_sharding.py in a subprocess with 8 CPU devices: sharded vs 1-device results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.json

Writes what it measured (equalities, max differences, trace counts) to OUT.json.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import TRACES, gaussian_score, problem  # noqa: E402

from diffpure_jax import PurifyConfig, purify, sharding  # noqa: E402
from diffpure_jax.certify import count_samples, smoothed_classifier  # noqa: E402
from diffpure_jax.classifier import Classifier  # noqa: E402
from diffpure_jax.runner import read_records, run_evaluation  # noqa: E402


def compare(a, b) -> dict:
    a, b = np.asarray(a), np.asarray(b)
    return {"equal": bool(np.array_equal(a, b)), "max_abs_diff": float(np.max(np.abs(a - b)))}


def main(out_path: str) -> None:
    report = {"n_devices": jax.device_count(), "seconds": {}}
    t0 = time.perf_counter()
    mesh8, mesh1 = sharding.data_mesh(), sharding.data_mesh(jax.devices()[:1])
    score = gaussian_score()
    config = PurifyConfig(t_star=0.05, dt=0.01)
    key = jax.random.key(0)
    x = jax.random.uniform(jax.random.key(1), (5, 4, 4, 3), minval=0.1, maxval=0.9)
    w = jax.random.normal(jax.random.key(2), x.shape)
    index = np.arange(100, 105)
    traces = []

    @jax.jit
    def purified(batch, score, index):
        traces.append(1)  # runs once per trace
        return purify(score, config, batch, key, index)

    @jax.jit
    def grads(batch, score, index):
        x, w = batch
        return jax.grad(lambda x: jnp.sum(w * purify(score, config, x, key, index)))(x)

    # Reference: plain jit on one device, no mesh, no padding. Sharded: padded to 8 over 8.
    ref = purified(x, score, jnp.asarray(index))
    ref_grad = grads((x, w), score, jnp.asarray(index))
    out = sharding.run_sharded(purified, x, score, mesh=mesh8, index=index)
    report["purify"] = compare(out, ref)
    report["grad"] = compare(
        sharding.run_sharded(grads, (x, w), score, mesh=mesh8, index=index), ref_grad
    )
    x8, i8 = sharding.shard_batch(
        (sharding.pad_to_multiple(x, 8), sharding.pad_index(index, 8)), mesh8
    )
    report["purify_out_spec"] = str(purified(x8, score, index=i8).sharding.spec)

    report["seconds"]["purify_and_grads"] = time.perf_counter() - t0
    # No recompilation: a fresh jitted function, two different batches (7 and 6 rows) that pad
    # to the same 8 rows: traced once.
    fresh = jax.jit(lambda batch, score, index: purified.__wrapped__(batch, score, index))
    traces.clear()
    x7 = jax.random.uniform(jax.random.key(3), (7, 4, 4, 3), minval=0.1, maxval=0.9)
    for batch, idx in ((x7, np.arange(7)), (x7[:6] * 0.5, np.arange(10, 16))):
        sharding.run_sharded(fresh, batch, score, mesh=mesh8, index=idx)
    report["purify_traces_two_batches"] = len(traces)

    # Certification: the noise counts of a denoised smoothed classifier, 5 images padded to 8
    # over 8 devices vs 1 device.
    weights = jax.random.normal(jax.random.key(5), (4 * 4 * 3, 3))
    classifier = Classifier(weights, lambda w, x: x.reshape(x.shape[0], -1) @ w, (4, 4, 3))
    smoothed = smoothed_classifier(classifier, 0.25, denoiser=score)
    counts = [
        count_samples(smoothed, x, key, index, n=40, batch=16, mesh=mesh) for mesh in (mesh1, mesh8)
    ]
    report["certify_counts"] = compare(counts[0], counts[1])
    report["certify_counts_total"] = int(counts[1].sum())

    # The runner end to end (PGD-EOT against a noisy MLP): 8 devices (batches of 5 padded to 8)
    # vs 1 device (no padding).
    evaluation, model, xs, ys, idx = problem(n=10, batch_size=5)
    with tempfile.TemporaryDirectory() as tmp:
        counts = {}

        def after(b):
            counts[b] = TRACES["model"]

        for name, mesh in (("mesh1", mesh1), ("mesh8", mesh8)):
            t0 = time.perf_counter()
            workdir = os.path.join(tmp, name)
            TRACES.clear()
            run_evaluation(evaluation, model, xs, ys, idx, workdir, False, after, mesh=mesh)
            report[f"runner_traces_{name}"] = dict(counts)
            report["seconds"][f"runner_{name}"] = time.perf_counter() - t0
        report["runner_records_equal"] = read_records(os.path.join(tmp, "mesh1")) == read_records(
            os.path.join(tmp, "mesh8")
        )
        report["runner_summary_equal"] = open(
            os.path.join(tmp, "mesh1", "summary.json")
        ).read() == (open(os.path.join(tmp, "mesh8", "summary.json")).read())
        adv = [np.load(os.path.join(tmp, m, "adv", "batch_00001.npz")) for m in ("mesh1", "mesh8")]
        report["runner_adv"] = compare(adv[0]["x_adv"], adv[1]["x_adv"])
        report["runner_adv_rows"] = int(adv[1]["x_adv"].shape[0])
        report["runner_n_records"] = len(read_records(os.path.join(tmp, "mesh8")))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
