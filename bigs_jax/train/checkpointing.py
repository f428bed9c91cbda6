"""Every Orbax call in the zoo, and the self-describing workdir layout.

A workdir holds `bigs_jax.json` (the marker that makes it ours, written first), `config.json`
(the resolved run config), `model.json` (model family + its frozen config),
`checkpoints/<step>/` (Orbax: items `params`, `opt_state`, `meta`) and TensorBoard event files.
`load_model` needs nothing but the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bigs_jax.models import FAMILIES, build, family_of
from bigs_jax.paths import flat_paths, path_str

CHECKPOINTS = "checkpoints"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"
# Written first into every directory bigs_jax creates, so a directory of someone else's (an HF
# model directory also has a config.json) is never mistaken for ours and written into.
MARKER_JSON = "bigs_jax.json"
WORKDIR_FORMAT = 1


# ---------------------------------------------------------------------------- model.json


def model_json(config) -> dict:
    return {"family": family_of(config).name, "config": dataclasses.asdict(config)}


def config_from_json(data: dict):
    family = data.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model.json names unknown family {family!r}; known: "
                         f"{sorted(FAMILIES)}")
    cls = FAMILIES[family].config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data["config"]) - fields)
    if unknown:
        raise ValueError(f"model.json has unknown {family} options {unknown}; was it written "
                         "by a newer bigs_jax?")
    return cls(**data["config"])


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON through a temp file and rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_marker(workdir: str, kind: str = "run") -> None:
    """Mark `workdir` as a bigs_jax directory of `kind` ("run": train loop / convert output,
    "eval": eval.py's output); `train.workdir.check_workdir` recognises it."""
    path = os.path.join(workdir, MARKER_JSON)
    if not os.path.exists(path):
        write_json_atomic(path, {"bigs_jax": kind, "format": WORKDIR_FORMAT})


def read_model_config(workdir: str):
    path = os.path.join(workdir, MODEL_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a bigs_jax workdir "
                                "(made by train.py or `python -m bigs_jax.convert`)")
    with open(path) as f:
        return config_from_json(json.load(f))


# ---------------------------------------------------------------------------- manager


class Checkpointer:
    """Orbax CheckpointManager over `workdir/checkpoints`: async saves, keep the latest N."""

    def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
            item_names=("params", "opt_state", "meta"), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
        """Start an async save of step `step`; returns whether the policy saved."""
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, meta) restored onto the shardings of the abstract targets."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
        return out.params, out.opt_state, out.meta

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False when the service is not running)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_params_only(workdir: str, step: int, params, meta: Optional[dict] = None) -> None:
    """Write a checkpoint holding parameters only (converted or exported models)."""
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    ckpt.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta or {})), force=True)
    ckpt.wait()
    ckpt.close()


# ---------------------------------------------------------------------------- loading


def resolve(path: str, step: Optional[int] = None) -> tuple[str, int]:
    """(workdir, step) for a workdir or a `workdir/checkpoints/<step>` directory."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist; pass a workdir or a checkpoint step "
                                "directory")
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINTS and os.path.basename(path).isdigit():
        return os.path.dirname(parent), int(os.path.basename(path))
    steps = ocp.utils.checkpoint_steps(os.path.join(path, CHECKPOINTS)) if os.path.isdir(
        os.path.join(path, CHECKPOINTS)) else []
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {path}/{CHECKPOINTS}; train or "
                                    "convert a model into this workdir first")
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"step {step} not in {path}/{CHECKPOINTS} (have {sorted(steps)})")
    return path, step


def abstract_model(config):
    """(graphdef, abstract param state) of a model, without allocating it."""
    model = nnx.eval_shape(lambda: build(config))
    return nnx.split(model)


def restore_params(workdir: str, step: int, abstract_params):
    """Restore the `params` item of one step onto the abstract targets' shardings."""
    with ocp.CheckpointManager(os.path.join(workdir, CHECKPOINTS),
                               item_names=("params", "opt_state", "meta")) as manager:
        out = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    return out.params


def load_model(path: str, *, step: Optional[int] = None) -> nnx.Module:
    """The model of a workdir (latest step or `step`), or of one checkpoint step directory."""
    workdir, step = resolve(path, step)
    config = read_model_config(workdir)
    graphdef, abstract_state = abstract_model(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
    params = restore_params(workdir, step, target)
    return nnx.merge(graphdef, params)


def restore_matching(path: str, params) -> tuple[Any, str]:
    """`params` (a model's sharded pure dict) with what it shares with another checkpoint.

    Fine-tuning starts here: every parameter the checkpoint shares with `params` (same path,
    same shape) is restored onto that parameter's sharding and dtype; parameters the checkpoint
    lacks (a new classifier) keep their value; checkpoint parameters `params` lacks (an MLM
    head) are dropped. Returns (params, one-line report). Shared paths with different shapes
    raise ValueError listing them.
    """
    workdir, step = resolve(path)
    source = nnx.to_pure_dict(abstract_model(read_model_config(workdir))[1])
    src, dst = flat_paths(source), flat_paths(params)
    misshaped = sorted(f"{k} {tuple(src[k].shape)} vs {tuple(v.shape)}"
                       for k, v in dst.items() if k in src and src[k].shape != v.shape)
    if misshaped:
        raise ValueError(f"config.init {path} does not fit this model: {'; '.join(misshaped)}; "
                         "keep the checkpoint's architecture options (max_len, sizes)")
    mesh = next(iter(dst.values())).sharding.mesh
    fallback = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def abstract(path_, x):
        key = path_str(path_)
        like = dst.get(key)
        sharding = like.sharding if like is not None else fallback
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    restored = flat_paths(restore_params(workdir, step, jax.tree_util.tree_map_with_path(
        abstract, source)))
    fresh = sorted(k for k in dst if k not in src)
    unused = sorted(k for k in src if k not in dst)

    def pick(path_, like):
        key = path_str(path_)
        return restored[key].astype(like.dtype) if key in dst and key in src else like

    params = jax.tree_util.tree_map_with_path(pick, params)
    report = (f"initialized from {workdir} step {step}: {len(dst) - len(fresh)} arrays loaded"
              f"; new: {', '.join(fresh) or 'none'}; unused: {', '.join(unused) or 'none'}")
    return params, report


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
