"""Save and load converted or trained model variables: orbax params plus a small JSON config.

Layout of a checkpoint directory `checkpoints/NAME/`:
    config.json   {"architecture": str, "kwargs": {...}, "kind": "score" | "classifier", ...}
    variables/    orbax StandardCheckpointer tree ({"params": ..., "batch_stats": ...})
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_variables(directory: str, variables: Any, config: dict) -> None:
    """Write `variables` (a pytree of arrays) and `config` (JSON-serialisable) under `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, VARIABLES_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; remove it or choose another output directory.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory!r} is not a diffpure_jax checkpoint (no {CONFIG_FILE}). "
            "Convert an official "
            "checkpoint first, e.g. `python -m diffpure_jax.convert score-sde checkpoint_8.pth "
            f"{directory}` (see checkpoints/README.md)."
        )
    with open(path) as f:
        return json.load(f)


def load_variables(directory: str, abstract_variables: Any) -> Any:
    """Restore the variables saved under `directory` into the structure of `abstract_variables`
    (a pytree of jax.ShapeDtypeStruct, e.g. from `jax.eval_shape(model.init, ...)`)."""
    directory = os.path.abspath(directory)
    target = os.path.join(directory, VARIABLES_DIR)
    if not os.path.isdir(target):
        raise FileNotFoundError(
            f"{target} is missing: the checkpoint at {directory!r} is incomplete."
        )
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_variables)
    return ocp.StandardCheckpointer().restore(target, abstract)
