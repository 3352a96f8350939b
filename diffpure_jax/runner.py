"""The resumable, multi-host evaluation runner and its per-example records.

The protocols it applies are in `diffpure_jax.protocols`; the attack suites it runs are in
`diffpure_jax.attacks.suites`.

The runner is resumable and durable. It goes through the examples in fixed batches. A batch's
random key is derived from the run seed and the batch number, so a batch gives the same result
whether the run was interrupted or not. Each batch's adversarial examples go to `adv/` by an
atomic rename, then its per-example records are appended to `records.jsonl` and fsynced. A batch
is done once its records are in that file. A rerun with the same flags skips the batches already
done; with different flags it refuses, and nothing computed is lost. The summary (JSON and
Markdown) is derived from the records.

Before a batch is written, every adversarial example is checked to lie inside the threat
(`in_threat`). A record holds the example's label, clean and post-attack predictions, its score
per protocol and the pixel norms `linf` and `l2` of x_adv - x. For a spatial threat (StAdv) the
check is on the suite's sampling grid (bound, [-1, 1], and x_adv = grid_sample(x, grid)); the
record adds `flow_linf` (the threat's own norm: Linf of grid - identity, normalised grid units)
and `flow_smoothness` (`stadv.flow_norm`), and adv/ keeps the grid.

Devices and hosts (`diffpure_jax.sharding`). Each batch is padded to a multiple of the local
device count (copies of its first row, distinct negative dataset indices) and split over the
local devices; the padding rows are dropped before anything is written. With several processes
(`jax.distributed`, one workdir on a shared filesystem), process p runs the batches b with
b % process_count == p and appends its records to `records.p{p}.jsonl`. When all are done
(a barrier), process 0 merges every records file into `records.jsonl`, ordered by batch as a
single process writes it, removes the per-process files and writes the summary. Records, adv/
and the summary do not depend on the number of devices or processes, and a run can resume with
a different number of either: every records file of the workdir counts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .attacks.base import Threat, bind_index, in_threat, lp_norm
from .attacks.stadv import flow_linf, flow_norm
from .attacks.suites import SuiteResult
from .progress import progress_bar_or_none
from .protocols import draw_predictions, parse_protocols, protocol_scores
from .workdir import check_run_config, truncate_torn_tail

RECORDS = "records.jsonl"
PROCESS_RECORDS = "records.p{}.jsonl"  # one per process in a multi-process run, merged at the end
TIMINGS = "timings.jsonl"  # wall seconds per batch (not part of the results: runs differ)
PROCESS_TIMINGS = "timings.p{}.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation run: which attack, which protocols, where.

    attack: a suite, `attack(model, x, y, key) -> SuiteResult` (`diffpure_jax.attacks.suites`).
    description: the run's identity (its config), recorded in the workdir; a rerun with another
    description refuses.
    """

    attack: Callable[..., SuiteResult]
    threat: Threat
    protocols: tuple[str, ...] = ("one_draw",)
    batch_size: int = 64
    seed: int = 0
    description: dict = dataclasses.field(default_factory=dict)


def _fsync_append(path: str, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def records_path(workdir: str, process_index: int = 0, process_count: int = 1) -> str:
    """The records file a process appends to: records.jsonl alone, records.p{p}.jsonl if several."""
    name = RECORDS if process_count == 1 else PROCESS_RECORDS.format(process_index)
    return os.path.join(workdir, name)


def _record_files(workdir: str) -> list[str]:
    parts = glob.glob(os.path.join(workdir, PROCESS_RECORDS.format("*")))
    main = os.path.join(workdir, RECORDS)
    return ([main] if os.path.exists(main) else []) + sorted(parts)


def read_records(workdir: str) -> list[dict]:
    """Complete records of a workdir, from records.jsonl and any per-process records files, one
    per example index (the first found). A torn last line from a kill is ignored."""
    records, seen = [], set()
    for path in _record_files(workdir):
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                record = json.loads(line)
                if record["index"] not in seen:
                    seen.add(record["index"])
                    records.append(record)
    return records


def merge_records(workdir: str) -> None:
    """Fold the per-process records files into records.jsonl, ordered by batch (the order a
    single process writes), then remove them. Safe to interrupt: duplicates are ignored."""
    parts = _record_files(workdir)
    if not any(os.path.basename(p) != RECORDS for p in parts):
        return
    records = sorted(read_records(workdir), key=lambda r: r["batch"])  # stable within a batch
    path = os.path.join(workdir, RECORDS)
    tmp = path + ".merge.tmp"
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for part in parts:
        if os.path.basename(part) != RECORDS:
            os.remove(part)
    _merge_timings(workdir)


def _merge_timings(workdir: str) -> None:
    parts = sorted(glob.glob(os.path.join(workdir, PROCESS_TIMINGS.format("*"))))
    if not parts:
        return
    lines = [line for p in parts for line in open(p) if line.endswith("\n")]
    _fsync_append(os.path.join(workdir, TIMINGS), [line.rstrip("\n") for line in lines])
    for part in parts:
        os.remove(part)


def read_timings(workdir: str) -> list[dict]:
    """The workdir's per-batch timings, {batch, examples, seconds, process, first}: the wall
    time of a batch's attack and protocols, written after its records (`first`: the first batch
    a process ran in that sitting, which includes compilation)."""
    paths = glob.glob(os.path.join(workdir, "timings*.jsonl"))
    out = []
    for path in sorted(paths):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.endswith("\n")]
    return out


def seconds_per_example(workdir: str) -> float | None:
    """Wall seconds per example of a workdir's batches, leaving out each sitting's first batch
    (compilation) when other batches were timed; None if none was."""
    timings = read_timings(workdir)
    steady = [t for t in timings if not t["first"]] or timings
    n = sum(t["examples"] for t in steady)
    return sum(t["seconds"] for t in steady) / n if n else None


def run_evaluation(
    evaluation: Evaluation,
    logits_fn,
    x: np.ndarray,
    y: np.ndarray,
    index: np.ndarray,
    workdir: str,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """Attack and evaluate (x, y) batch by batch into `workdir`, resuming where it stopped.

    Args:
      logits_fn: (x, key, index=None) -> logits, the defended or undefended model; the runner
        binds each batch's dataset indices and replicates its arrays over the mesh.
      x: (N, H, W, C) in [0, 1]; y: (N,); index: (N,) dataset indices (the noise follows them).
        Every process passes the same full arrays.
      after_batch: called with the batch number after each batch is durably written (tests use it
        to simulate a kill).
      mesh: the devices a batch is split over (default: `sharding.data_mesh()`, all local ones).
    Returns: the summary dict (written to summary.json and summary.md by process 0).
    """
    check_run_config(workdir, evaluation.description)
    process, n_processes = jax.process_index(), jax.process_count()
    own_records = records_path(workdir, process, n_processes)
    truncate_torn_tail(own_records)
    os.makedirs(os.path.join(workdir, "adv"), exist_ok=True)
    all_records = read_records(workdir)
    done = {r["index"] for r in all_records}
    protocols = parse_protocols(evaluation.protocols)
    x, y, index = np.asarray(x), np.asarray(y), np.asarray(index)
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):
        # Checked here: inside a multi-device program the model's own check aborts the process.
        raise ValueError(f"images must be in [0, 1], got [{x.min()}, {x.max()}]")
    if not len(x) == len(y) == len(index):
        raise ValueError(f"x, y and index differ in length: {len(x)}, {len(y)}, {len(index)}")
    n = len(x)
    size = evaluation.batch_size
    batches = [(b, slice(s, min(s + size, n))) for b, s in enumerate(range(0, n, size))]
    mine = [batches[b] for b in sharding.process_batches(len(batches), process, n_processes)]
    mesh = sharding.data_mesh() if mesh is None else mesh
    logits_fn = sharding.replicate(logits_fn, mesh)
    desc = "evaluating" if n_processes == 1 else f"evaluating (process {process}/{n_processes})"
    progress_bar = progress_bar_or_none(len(mine), progress, desc, "batch")
    key = jax.random.key(evaluation.seed)
    own_timings = os.path.join(
        workdir, TIMINGS if n_processes == 1 else PROCESS_TIMINGS.format(process)
    )
    first = True
    for b, sl in mine:
        if all(int(i) in done for i in index[sl]):
            progress_bar.update(1)
            continue
        started = time.perf_counter()
        batch_key = jax.random.fold_in(key, b)
        # Pad to a multiple of the device count (copies of the first row, distinct negative
        # indices) and split over the mesh; the padding rows never reach the records.
        padded = sharding.pad_to_multiple((x[sl], y[sl]), mesh.size)
        padded_index = sharding.pad_index(index[sl], mesh.size)
        xb, yb, ib = sharding.shard_batch((*padded, padded_index), mesh)
        model = bind_index(logits_fn, ib)
        records = _run_batch(
            evaluation, protocols, model, xb, yb, (x[sl], y[sl], index[sl]), batch_key, workdir, b
        )
        _fsync_append(own_records, [json.dumps(r, sort_keys=True) for r in records])
        seconds = time.perf_counter() - started
        timing = dict(batch=b, examples=len(records), seconds=seconds, process=process, first=first)
        _fsync_append(own_timings, [json.dumps(timing, sort_keys=True)])
        first = False
        all_records += records
        _update_progress(progress_bar, all_records)
        if after_batch is not None:
            after_batch(b)
    progress_bar.close()
    if n_processes == 1:
        merge_records(workdir)  # folds in the files of an earlier multi-process attempt, if any
        return write_summary(workdir, evaluation)
    sharding.barrier("diffpure_jax.runner: all batches written")
    if process == 0:
        merge_records(workdir)
        summary = write_summary(workdir, evaluation)
    sharding.barrier("diffpure_jax.runner: summary written")
    if process != 0:
        with open(os.path.join(workdir, SUMMARY_JSON)) as f:
            summary = json.load(f)
    return summary


def _run_batch(evaluation, protocols, model, xb, yb, real, key, workdir, b):
    """One batch. xb, yb: the padded, sharded batch (model bound to its padded indices);
    real: the (x, y, index) NumPy rows of the batch; only these are checked and recorded."""
    x, y, index = real
    n = len(index)
    k_attack, k_protocol = jax.random.split(key)
    result = evaluation.attack(model, xb, yb, k_attack)
    x_adv, attack_preds, clean_pred = result.x_adv, result.attack_preds, result.clean_pred
    scores = {}
    for name, score in (result.attack_scores or {}).items():
        scores[name] = score  # the attack's own scoring, e.g. DiffHammer's N-evaluation
    for kind, n_draws in protocols:
        if kind == "one_draw":
            scores["one_draw"] = result.robust
            continue
        preds = draw_predictions(model, x_adv, jax.random.fold_in(k_protocol, n_draws), n_draws)
        scores[f"{kind}_of_{n_draws}"] = protocol_scores(preds, yb, kind)
    # Drop the padding rows.
    x_adv = np.asarray(x_adv)[:n]
    clean_pred = np.asarray(clean_pred)[:n]
    attack_preds = {k: np.asarray(v)[:n] for k, v in attack_preds.items()}
    scores = {k: np.asarray(v)[:n] for k, v in scores.items()}
    # A spatial threat (StAdv) bounds the sampling grid, so the check needs the suite's grid.
    grid = None if result.grid is None else np.asarray(result.grid)[:n]
    if evaluation.threat.spatial and grid is None:
        raise RuntimeError(
            f"the attack returned no sampling grid for the {evaluation.threat} threat, so its "
            "examples cannot be checked; no records were written for this batch."
        )
    grid_j = None if grid is None else jnp.asarray(grid)
    inside = np.asarray(
        in_threat(jnp.asarray(x_adv), jnp.asarray(x), evaluation.threat, grid=grid_j)
    )
    if not inside.all():
        bad = [int(i) for i in index[~inside]]
        raise RuntimeError(
            f"adversarial examples of indices {bad} are outside the {evaluation.threat} ball or "
            "[0, 1]: the attack is broken; no records were written for this batch."
        )
    norms = {name: np.asarray(lp_norm(jnp.asarray(x_adv - x), name)) for name in ("Linf", "L2")}
    if evaluation.threat.spatial:  # the threat's own norm (normalised grid units), smoothness
        norms["flow_linf"] = np.asarray(flow_linf(grid_j))
        norms["flow_smoothness"] = np.asarray(flow_norm(grid_j))
    path = os.path.join(workdir, "adv", f"batch_{b:05d}.npz")
    tmp = path + ".tmp.npz"
    extra = {} if grid is None else {"grid": grid}
    np.savez_compressed(tmp, index=index, x_adv=x_adv, y=y, **extra)
    os.replace(tmp, path)
    records = []
    for i in range(n):
        records.append(
            {
                "index": int(index[i]),
                "label": int(y[i]),
                "clean_pred": int(clean_pred[i]),
                "attack_preds": {k: int(v[i]) for k, v in attack_preds.items()},
                "robust": {
                    k: (bool(v[i]) if v.dtype == bool else float(v[i])) for k, v in scores.items()
                },
                "linf": float(norms["Linf"][i]),
                "l2": float(norms["L2"][i]),
                "batch": b,
            }
        )
        for name in ("flow_linf", "flow_smoothness"):
            if name in norms:
                records[-1][name] = float(norms[name][i])
    return records


def summarize(records: list[dict]) -> dict:
    """Clean accuracy and robust accuracy per protocol (in %), from per-example records."""
    n = len(records)
    if n == 0:
        return {"n_examples": 0}
    clean = 100.0 * np.mean([r["clean_pred"] == r["label"] for r in records])
    protocols = sorted({p for r in records for p in r["robust"]})
    robust = {
        p: 100.0 * float(np.mean([float(r["robust"][p]) for r in records])) for p in protocols
    }
    attacks = list(records[0]["attack_preds"])
    after = {
        a: 100.0 * float(np.mean([r["attack_preds"][a] == r["label"] for r in records]))
        for a in attacks
    }
    return {
        "n_examples": n,
        "clean_accuracy": float(clean),
        "robust_accuracy": robust,
        "accuracy_after_each_attack_one_draw": after,
        "max_linf": float(max(r["linf"] for r in records)),
        "max_l2": float(max(r["l2"] for r in records)),
        **(
            {"max_flow_linf": float(max(r["flow_linf"] for r in records))}
            if "flow_linf" in records[0]
            else {}
        ),
    }


def write_summary(workdir: str, evaluation: Evaluation) -> dict:
    records = sorted(read_records(workdir), key=lambda r: r["index"])
    summary = {"settings": evaluation.description, **summarize(records)}
    with open(os.path.join(workdir, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, SUMMARY_MD), "w") as f:
        f.write(markdown_table(summary))
    return summary


def markdown_table(summary: dict) -> str:
    """A Markdown table of the summary: one row per protocol."""
    s = summary.get("settings", {})
    lines = [
        f"Settings: {json.dumps(s, sort_keys=True)}",
        "",
        "| protocol | examples | clean acc (%) | robust acc (%) |",
        "|---|---|---|---|",
    ]
    for p, acc in summary.get("robust_accuracy", {}).items():
        lines.append(
            f"| {p} | {summary['n_examples']} | {summary['clean_accuracy']:.2f} | {acc:.2f} |"
        )
    after = summary.get("accuracy_after_each_attack_one_draw", {})
    if after:
        lines += ["", "| after attack (one draw, cumulative) | accuracy (%) |", "|---|---|"]
        lines += [f"| {a} | {v:.2f} |" for a, v in after.items()]
    return "\n".join(lines) + "\n"


def _update_progress(bar, records: list[dict]) -> None:
    summary = summarize(records)
    robust = summary.get("robust_accuracy", {})
    shown = " ".join(f"{k}={v:.1f}%" for k, v in robust.items())
    bar.set_postfix_str(
        f"n={summary['n_examples']} clean={summary.get('clean_accuracy', 0):.1f}% {shown}"
    )
    bar.update(1)
