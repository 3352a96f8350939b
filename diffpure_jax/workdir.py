"""A resumable job's working directory: its settings file and its append-only logs."""

from __future__ import annotations

import json
import os

RUN_CONFIG = "run_config.json"


def changed_settings(workdir: str, description: dict) -> list[str]:
    """The settings in which the run recorded in `workdir` differs from `description` (sorted;
    empty when they agree or nothing is recorded yet)."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        previous = json.load(f)
    return sorted(
        k for k in set(previous) | set(description) if previous.get(k) != description.get(k)
    )


def check_run_config(workdir: str, description: dict) -> None:
    """Record a run's settings in `workdir`, or refuse (keeping its results) if they differ."""
    path = os.path.join(workdir, RUN_CONFIG)
    changed = changed_settings(workdir, description)
    if changed:
        raise ValueError(
            f"{workdir} holds a run with different settings ({', '.join(changed)}); its "
            "results are kept. Rerun with the same flags to resume, or use another --workdir."
        )
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # processes of one run may write it at once
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def truncate_torn_tail(path: str) -> None:
    """Drop a partly written last line (a kill mid-write) from an append-only log."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        with open(path, "wb") as f:
            f.write(data[: data.rfind(b"\n") + 1])
