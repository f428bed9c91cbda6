"""Device mesh (data, fsdp, tensor), logical-axis rules and the shardings of state and batch.

Model code names logical axes only (`batch`, `embed`, `mlp`, `heads`, `vocab`, ...); the rules
in the config map them onto mesh axes here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A mesh over all (or the given) devices with axes (data, fsdp, tensor).

    Axis types are Auto: with Explicit axes a matmul over a sharded contraction dim needs an
    explicit out_sharding, which model code must not know about.
    """
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of (B, ...) batch arrays: B over the mesh axes the `batch` rule names."""
    axes = dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(axes))
