"""One process of a multi-process run of the evaluation runner (tests/test_multihost.py), and the
tiny problem that tests/test_sharding.py and tests/test_multihost.py run.

    python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR OUT.json

NUM_PROCESSES 1 is a plain single-process run (PORT unused).
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Traces of NoisyModel (calls on tracers: inside jit), to check that batches do not recompile.
TRACES = collections.Counter()


class NoisyModel(eqx.Module):
    """A random 'defense': MLP logits plus Gaussian noise drawn from (key, dataset index)."""

    model: eqx.Module
    scale: float = 1.0

    def __call__(self, x, key, index=None, draw=0):
        if isinstance(x, jax.core.Tracer):
            TRACES["model"] += 1
        index = jnp.arange(x.shape[0]) if index is None else index
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (10,)))(index)
        return self.model(x) + self.scale * noise


def problem(n: int = 10, batch_size: int = 3):
    """(evaluation, model, x, y, index): PGD-EOT on a noisy trained MLP, n synthetic examples."""
    from attack_models import synthetic_data, trained_mlp

    from diffpure_jax.attacks.base import Threat
    from diffpure_jax.evaluate import Evaluation, pgd_suite

    threat = Threat("Linf", 0.06)
    evaluation = Evaluation(
        attack=pgd_suite(threat, n_iter=3, n_eot=2),
        threat=threat,
        protocols=("one_draw", "majority_of_3"),
        batch_size=batch_size,
        seed=5,
        description={"test": "multihost", "n": n, "batch_size": batch_size},
    )
    x, y = synthetic_data(n, seed=11)
    return evaluation, NoisyModel(trained_mlp()), np.asarray(x), np.asarray(y), np.arange(n) + 200


def main(port: str, num_processes: str, process_id: str, workdir: str, out_path: str) -> None:
    from diffpure_jax import sharding
    from diffpure_jax.evaluate import run_evaluation

    n = int(num_processes)
    coordinator = f"localhost:{port}" if n > 1 else None
    assert sharding.initialize_distributed(coordinator, n, int(process_id)) == (n > 1)
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
