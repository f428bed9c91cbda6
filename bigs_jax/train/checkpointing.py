"""Every Orbax call in the zoo, and the self-describing workdir layout.

A workdir holds `bigs_jax.json` (the marker that makes it ours, written first), `config.json`
(the resolved run config), `model.json` (model family + its frozen config),
`checkpoints/<step>/` (Orbax: items `params`, `opt_state`, `meta`, and for a streamed input
`data`, each process's input position in `data/process_<i>-of-<n>`) and TensorBoard event
files.
`load_model` needs nothing but the path.

A step whose files are missing or cannot be read is *damaged*: every read of a step goes
through `_read_step`, which names the step and what is wrong in one `DamagedCheckpoint` line.
The train loop then resumes from the newest intact step and moves the damaged ones to
`damaged_checkpoints/` (`set_aside`: kept, never deleted, and out of reach of the manager's
retention and of the saves that retrain those steps).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from bigs_jax import fs
from bigs_jax.errors import CheckpointReadError, CheckpointWriteError, DamagedCheckpoint
from bigs_jax.models import FAMILIES, build, family_of
from bigs_jax.paths import flat_paths, path_str

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"  # where the train loop moves damaged steps (never deleted)
ITEMS = ("params", "opt_state", "meta")
# Optional item: the input position of each process (`DataStateHandler`), so that a streamed
# input resumes without replaying the rows it consumed. A step without it is still intact.
DATA = "data"
# The file each item's directory needs before anything in it can be read: the pytree metadata
# of StandardSave items, the JSON of JsonSave ones.
_ITEM_INDEX = {"params": "_METADATA", "opt_state": "_METADATA", "meta": "metadata"}
# Read failures that say nothing about the files (TensorStore/absl status codes, errnos):
# memory, network, quota, permissions. Anything else failing to read a step's files is damage.
_PASSING_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                   "UNAUTHENTICATED", "CANCELLED", "ABORTED")
_PASSING_ERRNO = {errno.EACCES, errno.EPERM, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT,
                  errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH}
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
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError("model.json is not a {\"family\": ..., \"config\": {...}} object")
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
    """Write JSON whole or not at all (`fs.write_json`), so a crash never leaves half a
    file."""
    fs.write_json(path, data)


def write_marker(workdir: str, kind: str = "run") -> None:
    """Mark `workdir` as a bigs_jax directory of `kind` ("run": train loop / convert output,
    "eval": eval.py's output); `train.workdir.check_workdir` recognises it."""
    path = fs.join(workdir, MARKER_JSON)
    if not fs.exists(path):
        write_json_atomic(path, {"bigs_jax": kind, "format": WORKDIR_FORMAT})


def read_model_config(workdir: str):
    path = fs.join(workdir, MODEL_JSON)
    if not fs.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a bigs_jax workdir "
                                "(made by train.py or `python -m bigs_jax.convert`)")
    try:
        data = fs.read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    return config_from_json(data)


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
        self.workdir = fs.resolve(workdir)
        _quiet_failed_io()
        self.manager = ocp.CheckpointManager(
            fs.join(self.workdir, CHECKPOINTS),
            item_names=ITEMS + (DATA,), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False,
             data_state: Optional[bytes] = None) -> bool:
        """Start an async save of step `step` (with this process's input position
        `data_state`, if given); returns whether the policy saved. CheckpointWriteError if
        this or an earlier async write failed."""
        items = dict(params=ocp.args.StandardSave(params),
                     opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta))
        if data_state is not None:
            items[DATA] = DataStateSave(data_state)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._write_failed(e) from None

    def _write_failed(self, e: BaseException) -> CheckpointWriteError:
        # The failed write abandons its other fragment writes; at exit Python would report
        # each as a "coroutine ... was never awaited" warning after the run's one error line.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        latest = self.manager.latest_step()
        newest = ("there is no complete checkpoint yet" if latest is None else
                  f"the newest complete checkpoint is step {latest}")
        return CheckpointWriteError(
            f"writing a checkpoint to {self.manager.directory} failed ({_first_line(e)}); "
            f"{newest}; free space on that disk (or restore write access) and rerun the same "
            "command to resume")

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, meta) restored onto the shardings of the abstract targets;
        DamagedCheckpoint if the step's files are missing or cannot be read."""
        out = _read_step(self.workdir, step, ITEMS, lambda: self.manager.restore(
            step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore())))
        return out.params, out.opt_state, out.meta

    def restore_data_state(self, step: int) -> Optional[bytes]:
        """This process's input position saved with step `step`, None if the step has none
        for it (saved without one, or by another number of processes); ValueError saying why
        if it cannot be read."""
        if not fs.isdir(fs.join(self.workdir, CHECKPOINTS, str(step), DATA)):
            return None
        try:
            return getattr(self.manager.restore(step, args=ocp.args.Composite(
                **{DATA: DataStateRestore()})), DATA)
        except Exception as e:  # noqa: BLE001 -- any failure to read it means replaying
            raise ValueError(f"it cannot be read ({_first_line(e)})") from None

    def restore_newest_intact(self, abstract_params, abstract_opt_state, steps=None):
        """(step, (params, opt_state, meta), [DamagedCheckpoint of each newer step]) of the
        newest of `steps` (default: all) that restores; DamagedCheckpoint naming every step
        if none does (its `skipped` lists them)."""
        skipped = []
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            try:
                return step, self.restore(step, abstract_params, abstract_opt_state), skipped
            except DamagedCheckpoint as e:
                skipped.append(e)
        error = DamagedCheckpoint(
            f"no intact checkpoint in {self.manager.directory}: "
            f"{'; '.join(f'step {e.step}: {e.why}' for e in skipped)}; nothing was changed; "
            "move the damaged step directories out of it to start the run over, or use a new "
            "--workdir", skipped[0].step, "no intact step")
        error.skipped = skipped
        raise error

    def set_aside(self, step: int) -> str:
        """Move damaged step `step` to `<workdir>/damaged_checkpoints/` (a fresh name if taken)
        and forget it: nothing deletes it there, and retraining the step saves it anew."""
        dst = set_aside(self.workdir, step)
        self.manager.reload()
        return dst

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False when the service is not running)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until the async writes finish; CheckpointWriteError if one failed."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            raise self._write_failed(e) from None

    def close(self) -> None:
        self.manager.close()


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}"


class DataStateHandler(ocp.AsyncCheckpointHandler):
    """Orbax item of per-process bytes: every process writes its own file into the step's
    item directory, so the bytes are committed (and later deleted) with the step."""

    async def _write(self, directory: epath.Path, data: bytes) -> None:
        (directory / _process_file()).write_bytes(data)

    async def async_save(self, directory: epath.Path, args: "DataStateSave"):
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(directory, args.data), name="bigs_jax_data_state")]

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        (directory / _process_file()).write_bytes(args.data)

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> Optional[bytes]:
        del args
        path = directory / _process_file()
        return path.read_bytes() if path.exists() else None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    data: bytes


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def save_params_only(workdir: str, step: int, params, meta: Optional[dict] = None) -> None:
    """Write a checkpoint holding parameters only (converted or exported models)."""
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    try:
        ckpt.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta or {})),
            force=True)
        ckpt.manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointWriteError(f"writing the parameters failed ({_first_line(e)}); free "
                                   "space on that disk (or restore write access) and rerun"
                                   ) from None
    ckpt.close()


# ---------------------------------------------------------------------------- loading


def resolve(path: str, step: Optional[int] = None) -> tuple[str, int]:
    """(workdir, step) for a workdir or a `workdir/checkpoints/<step>` directory."""
    path = fs.resolve(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{path} does not exist; pass a workdir or a checkpoint step "
                                "directory")
    parent = fs.dirname(path)
    if fs.basename(parent) == CHECKPOINTS and fs.basename(path).isdigit():
        return fs.dirname(parent), int(fs.basename(path))
    steps = ocp.utils.checkpoint_steps(fs.join(path, CHECKPOINTS)) if fs.isdir(
        fs.join(path, CHECKPOINTS)) else []
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


def vocab_axes(config) -> dict[str, int]:
    """{path: axis} of a model's parameters that have a vocabulary axis (logical name
    `vocab`): the rows a padded vocabulary (`vocab_multiple`) adds live there."""
    axes = {}
    for path, var in nnx.to_flat_state(abstract_model(config)[1]):
        names = tuple(var.get_metadata().get("out_sharding") or ())
        if "vocab" in names:
            axes["/".join(map(str, path))] = names.index("vocab")
    return axes


def _padded_only(shape, target, axis: Optional[int]) -> bool:
    """`target` is `shape` with more rows on `axis` (a vocabulary padded further)."""
    return axis is not None and len(shape) == len(target) and all(
        s == t if i != axis else s < t for i, (s, t) in enumerate(zip(shape, target)))


def restore_params(workdir: str, step: int, abstract_params):
    """Restore the `params` item of one step onto the abstract targets' shardings;
    DamagedCheckpoint if its files are missing or cannot be read."""
    def read():
        with ocp.CheckpointManager(fs.join(workdir, CHECKPOINTS),
                                   item_names=ITEMS) as manager:
            return manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params))).params

    return _read_step(workdir, step, ("params",), read)


def _intact_steps(workdir: str, steps, abstract_params) -> list[int]:
    """Those of `steps` whose params restore, newest first."""
    intact = []
    for step in sorted(steps, reverse=True):
        try:
            restore_params(workdir, step, abstract_params)
            intact.append(step)
        except DamagedCheckpoint:
            pass
    return intact


def load_model(path: str, *, step: Optional[int] = None) -> nnx.Module:
    """The model of a workdir (latest step or `step`), or of one checkpoint step directory.

    Raises DamagedCheckpoint naming the step and the workdir's intact steps if the step's
    files are missing or cannot be read.
    """
    workdir, resolved = resolve(path, step)
    config = read_model_config(workdir)
    graphdef, abstract_state = abstract_model(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
    try:
        params = restore_params(workdir, resolved, target)
    except DamagedCheckpoint as e:
        others = [s for s in ocp.utils.checkpoint_steps(fs.join(workdir, CHECKPOINTS))
                  if s != resolved]
        intact = _intact_steps(workdir, others, target)
        fix = (f"load an intact one with bigs_jax.load({workdir!r}, step={intact[0]})"
               if intact else "retrain or reconvert the model")
        raise DamagedCheckpoint(f"{e}; intact steps: {intact or 'none'}; {fix}", e.step,
                                e.why) from None
    return nnx.merge(graphdef, params)


def restore_matching(path: str, params) -> tuple[Any, str]:
    """`params` (a model's sharded pure dict) with what it shares with another checkpoint.

    Fine-tuning starts here: every parameter the checkpoint shares with `params` (same path,
    same shape) is restored onto that parameter's sharding and dtype; parameters the checkpoint
    lacks (a new classifier) keep their value; checkpoint parameters `params` lacks (an MLM
    head) are dropped. A vocabulary padded further here (`vocab_multiple`) gets zero rows.
    Returns (params, one-line report). Shared paths with other different shapes raise
    ValueError listing them.
    """
    workdir, step = resolve(path)
    source_config = read_model_config(workdir)
    source = nnx.to_pure_dict(abstract_model(source_config)[1])
    src, dst = flat_paths(source), flat_paths(params)
    axes = vocab_axes(source_config)
    padded = {k for k, v in dst.items() if k in src and _padded_only(src[k].shape, v.shape,
                                                                       axes.get(k))}
    misshaped = sorted(f"{k} {tuple(src[k].shape)} vs {tuple(v.shape)}" for k, v in dst.items()
                       if k in src and src[k].shape != v.shape and k not in padded)
    if misshaped:
        raise ValueError(f"config.init {path} does not fit this model: {'; '.join(misshaped)}; "
                         "keep the checkpoint's architecture options (max_len, sizes)")
    mesh = next(iter(dst.values())).sharding.mesh
    fallback = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def abstract(path_, x):
        key = path_str(path_)
        like = dst.get(key)
        sharding = like.sharding if like is not None and key not in padded else fallback
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    restored = flat_paths(restore_params(workdir, step, jax.tree_util.tree_map_with_path(
        abstract, source)))
    fresh = sorted(k for k in dst if k not in src)
    unused = sorted(k for k in src if k not in dst)

    def pick(path_, like):
        key = path_str(path_)
        if key not in dst or key not in src:
            return like
        x = restored[key].astype(like.dtype)
        if key in padded:
            x = jax.device_put(jax.numpy.pad(x, [(0, t - s) for s, t in zip(x.shape,
                                                                             like.shape)]),
                               like.sharding)
        return x

    params = jax.tree_util.tree_map_with_path(pick, params)
    report = (f"initialized from {workdir} step {step}: {len(dst) - len(fresh)} arrays loaded"
              f"; new: {', '.join(fresh) or 'none'}; unused: {', '.join(unused) or 'none'}")
    return params, report


# ---------------------------------------------------------------------------- damage


def missing_files(workdir: str, step: int, items=ITEMS) -> Optional[str]:
    """What a look at the files finds missing from step `step`'s `items`, or None (a
    truncated file is found only by reading it: `_read_step`)."""
    for item in items:
        path = fs.join(workdir, CHECKPOINTS, str(step), item)
        if not fs.isdir(path):
            return f"{item}/ is missing"
        index = fs.join(path, _ITEM_INDEX[item])
        if not fs.isfile(index):
            return f"{item}/{_ITEM_INDEX[item]} is missing"
        if fs.size(index) == 0:
            return f"{item}/{_ITEM_INDEX[item]} is empty"
    return None


def _passing(e: BaseException) -> bool:
    """Whether a failed read is a passing failure (memory, network, permissions) rather than
    damage: any exception in its chain is a MemoryError, an OSError with such an errno, or a
    status naming such a code."""
    for _ in range(10):
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in _PASSING_ERRNO):
            return True
        if any(code in str(e) for code in _PASSING_STATUS):
            return True
        e = e.__cause__ or e.__context__
        if e is None:
            return False
    return False


def _first_line(e: BaseException) -> str:
    """An exception as one short line: the first line of its innermost cause (Orbax wraps
    TensorStore's status, e.g. OUT_OF_RANGE on a truncated file, in a page of spec)."""
    seen = [e]
    while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 10:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    lines = [line.strip() for line in str(seen[-1]).splitlines() if line.strip()]
    text = lines[0] if lines else type(seen[-1]).__name__
    return text if len(text) <= 240 else text[:237] + "..."


class _OrbaxFailureReports(logging.Filter):
    """Drops the ERROR reports (a traceback each) of Orbax's background save threads and of
    the asyncio futures its failed writes leave unretrieved: every failure they report is
    raised again in the loop's thread (`save` or `wait`) and reported there as one line with
    its cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname:
            return False
        if not record.exc_info:
            return True
        _, error, tb = record.exc_info
        # TensorStore raises from C++ (no Orbax frame), but names Orbax's temporary directory.
        return not ("orbax-checkpoint-tmp" in str(error) or any(
            "/orbax/" in frame.filename for frame in traceback.extract_tb(tb)))


def _quiet_failed_io() -> None:
    """Keep a failed checkpoint read or write to its one line: Orbax's error reports and the
    'Exception ignored' reports of the coroutines a failed TensorStore I/O leaves behind
    (printed whenever they are collected) are dropped; every other unraisable exception still
    reaches the hook that was installed. BIGS_JAX_DEBUG=1 keeps them all."""
    hook = sys.unraisablehook
    if os.environ.get("BIGS_JAX_DEBUG") == "1" or getattr(hook, "bigs_jax_quiet", False):
        return

    def quiet(unraisable):
        text = str(unraisable.exc_value)
        if not (text.startswith("Encountered error while reading array")
                or text == "Event loop is closed"):
            hook(unraisable)

    quiet.bigs_jax_quiet = True
    sys.unraisablehook = quiet
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxFailureReports())


def _read_step(workdir: str, step: int, items, read):
    """`read()`, the restore of `items` of step `step`, with any failure to find or read the
    step's files raised as one DamagedCheckpoint line."""
    why = missing_files(workdir, step, items)
    if why is None:
        try:
            return read()
        except Exception as e:  # noqa: BLE001 -- TensorStore, Orbax and JSON errors alike
            _quiet_failed_io()
            if _passing(e):
                raise CheckpointReadError(
                    f"reading checkpoint step {step} in {fs.join(workdir, CHECKPOINTS)} "
                    f"failed ({_first_line(e)}); this is not damage to its files, so nothing "
                    "was moved; free memory or restore access and rerun the same command"
                ) from None
            why = f"its files cannot be read ({_first_line(e)})"
    raise DamagedCheckpoint(f"checkpoint step {step} in {fs.join(workdir, CHECKPOINTS)} "
                            f"is damaged: {why}", step, why)


def set_aside(workdir: str, step: int) -> str:
    """Move `checkpoints/<step>` to `damaged_checkpoints/<step>` (`<step>.2`, ... if that is
    taken); returns the new path. Nothing is deleted."""
    dst_dir = fs.join(workdir, DAMAGED)
    fs.makedirs(dst_dir)
    dst, n = fs.join(dst_dir, str(step)), 1
    while fs.exists(dst):
        n += 1
        dst = fs.join(dst_dir, f"{step}.{n}")
    fs.rename(fs.join(workdir, CHECKPOINTS, str(step)), dst)
    return dst


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
