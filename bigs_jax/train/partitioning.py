"""Device mesh (data, fsdp, tensor), logical-axis rules and the shardings of state and batch.

Model code names logical axes only (`batch`, `embed`, `mlp`, `heads`, `vocab`, ...); the rules
in the config map them onto mesh axes here.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigs_jax.paths import path_str

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("state", None),
    ("layers", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry so the product equals `num_devices`; reject impossible shapes."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape {tuple(shape)} must have {len(MESH_AXES)} entries "
                         f"{MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)} has more than one -1; fix all but one")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape {tuple(shape)} cannot fill {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices but "
                         f"{num_devices} are available; set mesh.shape to match (-1 fills)")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None,
              dcn_shape: Sequence[int] = (1, 1, 1)) -> Mesh:
    """A mesh over all (or the given) devices with axes (data, fsdp, tensor).

    `shape` is the whole mesh; `dcn_shape` (multi-slice TPU, multi-node GPU) says how many
    slices each axis spans, so that axis's collectives cross the slower data-center network
    while the rest stay on the fast interconnect within a slice (JAX's hybrid device mesh).
    Axis types are Auto: with Explicit axes a matmul over a sharded contraction dim needs an
    explicit out_sharding, which model code must not know about.
    """
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(shape, len(devices))
    dcn = tuple(int(d) for d in dcn_shape)
    if any(s % d for s, d in zip(shape, dcn)):
        raise ValueError(f"mesh.dcn_shape {dcn} must divide mesh.shape {shape} axis by axis")
    if int(np.prod(dcn)) > 1:
        ici = tuple(s // d for s, d in zip(shape, dcn))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of (B, ...) batch arrays: B over the mesh axes the `batch` rule names."""
    axes = dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(axes))


def opt_state_shardings(opt_state, params, param_shardings, mesh: Mesh):
    """Shardings of an optimizer state: each leaf that mirrors a parameter takes exactly that
    parameter's sharding; every other leaf (step counts) is replicated.

    optax keeps per-parameter state (Adam's mu and nu, a growth wrapper's masks) as trees
    shaped like the params, nested in chains and groups (a masked group's tree has holes
    where other groups' params are), so a leaf mirrors parameter p when its key path ends
    with p's key path and its shape is p's; the longest such ending wins. Compiling `tx.init`
    is no substitute: its zeros depend on no input, and XLA replicates them.
    """
    by_path = {tuple(path): (x.shape, s) for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings),
        strict=True)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        for j in range(len(path)):
            hit = by_path.get(tuple(path[j:]))
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def indivisible(tree) -> list[str]:
    """'path shape: axis i (n) over mesh axes (...) = m' for each leaf of a tree of sharded
    ShapeDtypeStructs that its sharding cannot split evenly (XLA would stop with
    IndivisibleError)."""
    problems = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec, sizes = x.sharding.spec, dict(x.sharding.mesh.shape)
        for i, axes in enumerate(tuple(spec)[:len(x.shape)]):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([sizes[a] for a in axes]))
            if x.shape[i] % ways:
                problems.append(f"{path_str(path)} {tuple(x.shape)}: axis {i} ({x.shape[i]}) "
                                f"over mesh axes {axes} = {ways}")
    return problems


def bytes_per_device(tree) -> tuple[int, int]:
    """(total bytes, bytes each device holds) of a tree of arrays or ShapeDtypeStructs that
    carry shardings (each device holds one shard of every leaf)."""
    total = per_device = 0
    for x in jax.tree.leaves(tree):
        itemsize = np.dtype(x.dtype).itemsize
        total += int(np.prod(x.shape)) * itemsize
        per_device += int(np.prod(x.sharding.shard_shape(x.shape))) * itemsize
    return total, per_device


def _cluster_detected() -> bool:
    """True on a TPU pod slice or inside a multi-task SLURM job, where JAX finds its peers."""
    env = os.environ
    return bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1") or 1) > 1)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           timeout_s: int = 300, force: bool = False) -> bool:
    """Join a multi-process JAX runtime; returns whether one was joined.

    With a coordinator address the three values are explicit (local multi-process runs, GPU
    clusters without SLURM); without one, JAX's own cluster detection is used when `force` is
    set or a TPU pod / multi-task SLURM job is detected, and a single-process run does nothing.
    CPU processes use gloo collectives.
    """
    if coordinator_address is None and not (force or _cluster_detected()):
        return False
    if coordinator_address and process_id:
        # JAX's client aborts the process (no Python exception) when the coordinator never
        # answers, so check reachability first and fail with a message instead.
        _wait_for(coordinator_address, timeout_s)
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # the runtime raises XlaRuntimeError/RuntimeError/ValueError
        raise RuntimeError(
            f"could not join the JAX runtime at {coordinator_address or 'the detected cluster'} "
            f"within {timeout_s}s ({' '.join(str(e).split())[:300]}); check that every "
            "process was started with the same --coordinator_address and --num_processes and "
            "that the address is reachable") from None
    return True


def _wait_for(address: str, timeout_s: int) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"--coordinator_address {address!r} must be HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"coordinator {address} unreachable after {timeout_s}s ({e}); start process "
                    "0 first with the same --coordinator_address, or fix the address") from None
            time.sleep(1)


def _cpu_only() -> bool:
    """No accelerator plugin is installed (checked without initializing a backend)."""
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "libtpu",
                                                            "jax_cuda13_plugin"))
