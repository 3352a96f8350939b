"""Data parallelism: a batch split over the local devices, and batches split over processes.

Within a process, a batch is padded to a multiple of the local device count, placed with
`NamedSharding(mesh, P('data'))` on a 1-D mesh of the local devices, and run through an ordinary
`jax.jit` (or `eqx.filter_jit`); the model's arrays are replicated and XLA's partitioner splits
the batch over the devices. Across processes (hosts) nothing is sharded: process p runs the
batches b with b % process_count == p on its own devices, and the results meet on a shared
filesystem (`diffpure_jax.runner`). Every example is computed the same way whatever the number of
devices or hosts: sharded results equal unsharded ones bit for bit (tests/test_sharding.py).

Why jit over an `AxisType.Auto` mesh and not `jax.shard_map`: diffrax solves inside shard_map
cannot be differentiated today (`jax.grad` fails at trace time, on mismatched cond branch types
or on diffrax's closure conversion). Nor can they under jit over an Explicit mesh, which
`jax.make_mesh` builds by default, hence `data_mesh`. Only APIs common to the supported jax
versions (0.10.2 to 0.12) are used.

Two limits of `equinox.error_if` on a mesh: on a batch-sized array it pins its host callback to
device 0 and XLA then runs everything after it on the whole batch on every device (so
`purify.check_images` guards a scalar); and a failed check does not raise but aborts the process
(the other devices time out in an all-reduce). Validate inputs on the host before sharding them,
as `runner.run_evaluation` does.

Padding: rows are padded with copies of the first row and with distinct negative dataset indices
(`pad_index`). The purification noise is a function of (key, dataset index, draw, step), and the
attacks' random draws have the batch as leading axis, which `jax_threefry_partitionable` (jax's
default) makes prefix-consistent: row i of a (B + k, ...) draw equals row i of a (B, ...) draw.
So padding rows do not change the real rows' results; `unpad` drops them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"


# -- one process: a mesh over its local devices -------------------------------------------------


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: this process's local devices), Auto axis.

    Not `jax.make_mesh`, which defaults to Explicit axes since jax 0.9 (diffrax gradients fail
    there) and may reorder devices.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading axis split over the mesh: NamedSharding(mesh, P('data'))."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _leading(tree) -> int:
    sizes = {np.shape(a)[0] for a in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays must share one leading size, got {sorted(sizes)}")
    return sizes.pop()


def padded_size(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (and >= multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def pad_to_multiple(tree, n: int):
    """Pad every array of `tree` along axis 0 to a multiple of n with copies of its first row.

    NumPy arrays stay NumPy (no device transfer); jax arrays stay jax arrays.
    """
    size = _leading(tree)
    if size == 0:
        raise ValueError("cannot pad an empty batch")
    extra = padded_size(size, n) - size
    if extra == 0:
        return tree

    def pad(a):
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[:1], extra, axis=0)], axis=0)

    return jax.tree.map(pad, tree)


def pad_index(index, n: int):
    """Pad dataset indices (B,) to a multiple of n with distinct negative indices -1, -2, ...

    Negative indices are never dataset indices, so the padding rows draw their own noise.
    """
    index = np.asarray(index)
    extra = padded_size(len(index), n) - len(index)
    return np.concatenate([index, -1 - np.arange(extra, dtype=index.dtype)])


def unpad(tree, n: int):
    """The first n rows of every array of `tree` (undoes `pad_to_multiple`)."""
    return jax.tree.map(lambda a: a[:n], tree)


def shard_batch(arrays, mesh: Mesh):
    """Place every array of the pytree `arrays` with its leading axis split over the mesh.

    The leading size must be a multiple of the mesh size (use `pad_to_multiple`).
    """
    size = _leading(arrays)
    if size % mesh.size:
        raise ValueError(
            f"batch of {size} does not split over {mesh.size} devices; pad it first "
            "(pad_to_multiple)."
        )
    return jax.device_put(arrays, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Copy every jax/NumPy array of `tree` (e.g. an equinox model) to all devices of the mesh.

    Other leaves (functions, static fields, Python numbers) are left as they are.
    """
    sharding = replicated(mesh)

    def put(a):
        return jax.device_put(a, sharding) if isinstance(a, jax.Array | np.ndarray) else a

    return jax.tree.map(put, tree)


def run_sharded(
    fn: Callable[..., Any],
    batch,
    *args,
    mesh: Mesh | None = None,
    index=None,
):
    """fn on a padded, sharded batch; returns the result for the real rows only.

    Calls `fn(padded_batch, *replicated_args)` (plus `index=padded_index` if `index` is given),
    where every array of `batch` is padded with copies of its first row to a multiple of the mesh
    size and split over the mesh, `index` (B,) is padded with distinct negative indices, and the
    `args` are replicated. Every array of the result must have the batch as its leading axis; the
    padding rows are dropped. Pass a jitted `fn` made once: batches of the same padded size then
    reuse one compiled program.
    """
    mesh = data_mesh() if mesh is None else mesh
    n = _leading(batch)
    padded = shard_batch(pad_to_multiple(batch, mesh.size), mesh)
    kwargs = {}
    if index is not None:
        if len(index) != n:
            raise ValueError(f"index has {len(index)} entries for a batch of {n}")
        kwargs["index"] = shard_batch(pad_index(index, mesh.size), mesh)
    return unpad(fn(padded, *replicate(args, mesh), **kwargs), n)


# -- several processes (hosts) -----------------------------------------------------------------


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _cluster_detected() -> bool:
    """A multi-task Slurm or Open MPI job, which jax.distributed.initialize() detects itself."""
    for size_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if (_env_int(size_var) or 1) > 1:
            return True
    return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> bool:
    """Join a multi-process JAX run, or do nothing for a single process. Returns whether the run
    is (now) distributed.

    Each argument falls back to the environment: JAX_COORDINATOR_ADDRESS (also read by jax),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; in a multi-task Slurm or Open MPI job jax detects all
    three. With none of these, or num_processes == 1, this is a no-op. Must run before anything
    else touches a JAX device. `kwargs` go to `jax.distributed.initialize` (e.g.
    `initialization_timeout`). On CPU the processes talk through gloo (jax's default).
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes == 1:
        return False
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given) and not _cluster_detected():
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    return True


def process_batches(
    n_batches: int, process_index: int | None = None, process_count: int | None = None
) -> list[int]:
    """The batch numbers this process handles: b with b % process_count == process_index.

    A fixed assignment (it does not depend on what is already done), so processes that resume at
    different moments never take the same batch.
    """
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    return list(range(p, n_batches, n))


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather(tree):
    """Every process's host-local arrays (same shapes on every process), stacked along a new
    leading axis of size process_count, as NumPy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda a: np.asarray(a)[None], tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))
