"""Save and load converted or trained model variables: orbax params plus a small JSON config.

Layout of a checkpoint directory `checkpoints/NAME/`:
    config.json   {"architecture": str, "kwargs": {...}, "kind": "score" | "classifier", ...}
    variables/    orbax StandardCheckpointer tree ({"params": ..., "batch_stats": ...})

A directory that cannot be loaded raises `CheckpointError` (a ValueError; a missing one also a
FileNotFoundError), whose one-line message names the file, the field and what to do.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
KINDS = ("score", "classifier")
MAX_LISTED = 5  # mismatching keys named in an error

# How to get a checkpoint of each kind (see checkpoints/README.md).
_HOW_TO_GET = {
    "classifier": (
        "convert one, e.g. `python -m diffpure_jax.convert robustbench-wrn Standard.pt {d}`, "
        "or train one with `python -m experiments.train_classifier --out {d}`"
    ),
    "score": (
        "convert one, e.g. `python -m diffpure_jax.convert score-sde checkpoint_8.pth {d}`, "
        "or train one with `python -m experiments.train_score --out {d}`"
    ),
    None: (
        "convert an official checkpoint with `python -m diffpure_jax.convert ...` or train one "
        "with `python -m experiments.train_classifier` / `python -m experiments.train_score`"
    ),
}
_NAMES = {"classifier": "classifier", "score": "score model", None: "diffpure_jax"}

# The official checkpoints by their default directory name (checkpoints/README.md says where to
# get each file): name -> (`python -m diffpure_jax.convert` source, official file name).
OFFICIAL = {
    "cifar10-ddpmpp-deep-cont": ("score-sde", "checkpoint_8.pth"),
    "cifar10-wrn-28-10": ("robustbench-wrn", "Standard.pt"),
    "cifar10-wrn-70-16-dp": ("diffpure-wrn-dropout", "weights.pt"),
    "cifar10-dm-wrn": ("robustbench-dm-wrn", "weights-best.pt"),
    "imagenet-adm-256-uncond": ("guided-diffusion", "256x256_diffusion_uncond.pt"),
    "celebahq-ddpm-256": ("ddpm-celebahq", "celeba_hq.ckpt"),
    "imagenet-resnet50": ("torchvision-resnet50", "resnet50-0676ba61.pth"),
    "imagenet-wrn-50-2": ("torchvision-wide-resnet50-2", "wide_resnet50_2-95faca4d.pth"),
    "imagenet-deit-s": ("deit-s", "deit_small_patch16_224-cd65a155.pth"),
    "celebahq-eyeglasses": ("celebahq-attribute", "net_best.pth"),
    "celebahq-smiling": ("celebahq-attribute", "net_best.pth"),
}


def how_to_get(directory: str, kind: str | None) -> str:
    """What to do about a missing checkpoint at `directory`: the converter command of the
    official file it is named after, else the generic advice for its kind."""
    name = os.path.basename(os.path.normpath(directory))
    if name in OFFICIAL:
        source, file = OFFICIAL[name]
        command = f"python -m diffpure_jax.convert {source} {file} {directory}"
        return f"convert the official file: `{command}`"
    return _HOW_TO_GET[kind].format(d=directory)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says which file and field."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (no config.json) at the given path."""


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


def read_config(directory: str, kind: str | None = None) -> dict:
    """The parsed config.json of the checkpoint at `directory`.

    kind: 'classifier' or 'score' to check the config's `kind` field too (and to name the right
    converter when the checkpoint is missing). Raises CheckpointError (CheckpointNotFoundError
    when there is no config.json) naming the file and the bad field.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(directory) else f"has no {CONFIG_FILE}"
        raise CheckpointNotFoundError(
            f"no {_NAMES[kind]} checkpoint at {directory!r} ({what}); "
            f"{how_to_get(directory, kind)} (see checkpoints/README.md)."
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); restore it from the original checkpoint or "
            "re-convert."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object, got {type(config).__name__}; restore it or "
            "re-convert."
        )
    _check_fields(path, config)
    if kind is not None and config["kind"] != kind:
        other = "load_score_model/load_purifier" if config["kind"] == "score" else "load_classifier"
        raise CheckpointError(
            f"{directory!r} holds a {_NAMES[config['kind']]} ({path} field "
            f"'kind' is {config['kind']!r}), not a {_NAMES[kind]}; load it with {other}."
        )
    return config


def _check_fields(path: str, config: dict) -> None:
    def bad(field: str, want: str):
        got = f"got {config[field]!r}" if field in config else "missing"
        return CheckpointError(
            f"{path}: field {field!r} must be {want} ({got}); restore config.json or re-convert."
        )

    if config.get("kind") not in KINDS:
        raise bad("kind", " or ".join(map(repr, KINDS)))
    if not isinstance(config.get("architecture"), str):
        raise bad("architecture", "an architecture name such as 'wideresnet'")
    if not isinstance(config.get("kwargs"), dict):
        raise bad("kwargs", "an object of architecture options")
    shape = config.get("input_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise bad("input_shape", "[H, W, C], three positive integers")


def _keystr(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_keystr(p): tuple(leaf.shape) for p, leaf in leaves}


def compare_shapes(stored: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """One line per mismatching key (built but not stored, stored but not built, or both shapes),
    sorted by key."""
    lines = []
    for key in sorted(set(stored) | set(expected)):
        if key not in stored:
            lines.append(f"{key} {expected[key]} built but not stored")
        elif key not in expected:
            lines.append(f"{key} {stored[key]} stored but not built")
        elif stored[key] != expected[key]:
            lines.append(f"{key} stored {stored[key]}, built {expected[key]}")
    return lines


def load_variables(directory: str, abstract_variables: Any, restore: bool = True) -> Any:
    """Restore the variables saved under `directory` into the structure of `abstract_variables`
    (a pytree of jax.ShapeDtypeStruct, e.g. from `jax.eval_shape(model.init, ...)`).

    The stored tree's keys and shapes are compared with `abstract_variables` first: a mismatch
    (an edited architecture in config.json) raises CheckpointError with the count and the first
    few mismatching keys. restore=False stops there (a check that reads metadata only) and
    returns `abstract_variables`."""
    directory = os.path.abspath(directory)
    target = os.path.join(directory, VARIABLES_DIR)
    if not os.path.isdir(target):
        raise CheckpointNotFoundError(
            f"{target} is missing: the checkpoint at {directory!r} is incomplete; re-convert it."
        )
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(target)
        stored = _shapes(getattr(metadata, "item_metadata", metadata))
    except Exception as e:  # orbax raises many types; keep the first line only
        raise CheckpointError(
            f"cannot read {target} ({type(e).__name__}: {first_line(e)}); re-convert it."
        ) from e
    if not stored:
        raise CheckpointError(
            f"{target} holds no readable variables (no orbax metadata): the checkpoint is "
            "incomplete or corrupt; re-convert it."
        )
    mismatches = compare_shapes(stored, _shapes(abstract_variables))
    if mismatches:
        listed = "; ".join(mismatches[:MAX_LISTED])
        more = (
            f"; ... ({len(mismatches) - MAX_LISTED} more)" if len(mismatches) > MAX_LISTED else ""
        )
        raise CheckpointError(
            f"{os.path.join(directory, CONFIG_FILE)}: the config.json's architecture (fields "
            "'architecture', 'kwargs') does not match the stored variables; re-convert or restore "
            f"config.json. {len(mismatches)} mismatching keys: {listed}{more}."
        )
    if not restore:
        return abstract_variables
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_variables)
    try:
        return checkpointer.restore(target, abstract)
    except Exception as e:
        raise CheckpointError(
            f"cannot restore {target} ({type(e).__name__}: {first_line(e)}); re-convert it."
        ) from e


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters."""
    line = (str(e).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
