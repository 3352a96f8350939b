"""One process of a multi-process run of the evaluation runner (tests/test_multihost.py) on the
tiny problem of `helpers.problem`.

    python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR OUT.json

NUM_PROCESSES 1 is a plain single-process run (PORT unused).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port: str, num_processes: str, process_id: str, workdir: str, out_path: str) -> None:
    from diffpure_jax import sharding
    from diffpure_jax.runner import run_evaluation

    n = int(num_processes)
    coordinator = f"localhost:{port}" if n > 1 else None
    assert sharding.initialize_distributed(coordinator, n, int(process_id)) == (n > 1)
    from helpers import problem  # after jax.distributed: it builds and trains a model

    evaluation, model, x, y, index = problem()
    summary = run_evaluation(evaluation, model, x, y, index, workdir, progress=False)
    gathered = sharding.gather(np.array([jax.process_index(), jax.local_device_count()]))
    report = {
        "summary": summary,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "batches": sharding.process_batches(4),
        "gathered": gathered.tolist(),
    }
    with open(out_path, "w") as f:
        json.dump(report, f)
    if n > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
