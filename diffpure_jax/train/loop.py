"""The loop every trainer shares: seeded batches, a progress bar, a metrics log, periodic orbax
checkpoints of the whole training state, and resume after a kill.

Batch `step` is a pure function of (seed, step) (`batch_indices`) and the step's PRNG key is
`fold_in(key(seed), step)`, so a run killed and resumed from its last checkpoint computes the same
steps as an uninterrupted one.

Workdir layout:
    run_config.json   the settings; a rerun with other settings refuses and keeps the work
    checkpoints/N/    orbax checkpoints of the state after N steps (the last two are kept)
    log.jsonl         {"step", "elapsed_s", metrics...} every `log_every` steps
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..progress import progress_bar_or_none
from ..workdir import check_run_config

LOG_FILE = "log.jsonl"

# (state, batch (tuple of arrays), key) -> (state, metrics {name: scalar})
StepFn = Callable[[Any, tuple, jax.Array], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """n_steps optimiser steps of batch_size examples; checkpoint every save_every steps."""

    n_steps: int
    batch_size: int
    seed: int = 0
    save_every: int = 500
    log_every: int = 50


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """(batch_size,) indices of batch `step`: epochs are seeded permutations, the tail dropped."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n_examples} training examples")
    epoch, i = divmod(step, per_epoch)
    return _epoch_permutation(n_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def read_log(workdir: str) -> list[dict]:
    path = os.path.join(workdir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _rewrite_log(workdir: str, lines: list[dict]) -> None:
    path = os.path.join(workdir, LOG_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(path + ".tmp", path)


def _append_log(workdir: str, line: dict) -> None:
    with open(os.path.join(workdir, LOG_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_training(
    state: Any,
    step_fn: StepFn,
    data: tuple[np.ndarray, ...],
    config: LoopConfig,
    workdir: str,
    description: dict,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> Any:
    """Run (or resume) `config.n_steps` steps of `step_fn` over `data`; return the final state.

    `state` is the freshly initialised state, a pytree with an integer "step" entry; if
    `workdir` holds a checkpoint of the same run (same `description`), training continues from
    the latest one (if that is already at or past n_steps, it is returned untouched: this is how
    a finished or running job's latest state is exported). `data` are arrays with a shared first
    axis; each step gets them indexed by `batch_indices`. `after_step(step)` runs after every
    step (tests use it to simulate a kill).
    """
    check_run_config(workdir, description)
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2),
    )
    start, elapsed = 0, 0.0
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(state))
        start = int(state["step"])
        if start < config.n_steps:
            # Steps logged after the checkpoint will be recomputed: drop them.
            log = [line for line in read_log(workdir) if line["step"] <= start]
            _rewrite_log(workdir, log)
            elapsed = log[-1]["elapsed_s"] if log else 0.0

    n = len(data[0])
    key = jax.random.key(config.seed)
    bar = progress_bar_or_none(config.n_steps, progress, "training", "step", initial=start)
    t0 = time.perf_counter() - elapsed
    for step in range(start, config.n_steps):
        idx = batch_indices(n, config.batch_size, config.seed, step)
        state, metrics = step_fn(state, tuple(a[idx] for a in data), jax.random.fold_in(key, step))
        done = step + 1
        if done % config.log_every == 0 or done == config.n_steps:
            values = {k: float(v) for k, v in metrics.items()}
            _append_log(
                workdir, {"step": done, "elapsed_s": round(time.perf_counter() - t0, 2), **values}
            )
            bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in values.items()))
        if done % config.save_every == 0 or done == config.n_steps:
            manager.save(done, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()  # a kill right after still finds this checkpoint
        bar.update(1)
        if after_step is not None:
            after_step(done)
    manager.close()
    bar.close()
    return state
