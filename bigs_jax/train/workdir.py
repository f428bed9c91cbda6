"""A run's workdir and model: checked before anything is written, then recorded in it.

`check_workdir` refuses a path that cannot be written or a directory that is not ours;
`eval_output` claims eval.py's output directory and gives it back if the evaluation fails;
`model_config_from` resolves the frozen model config of a run (registry entry, `config.init`
checkpoint, what the data fixes); `prepare_workdir` writes the marker, config.json and
model.json, refusing a workdir of another model.

A directory is ours when it holds `bigs_jax.json` (checkpointing.MARKER_JSON) of the right kind,
or, written before the marker existed, a model.json or config.json of ours. Anything else that
is not empty (an HF model directory, a home directory) is refused before a byte is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from typing import Iterator, Optional

from ml_collections import ConfigDict

from bigs_jax import fs
from bigs_jax.data import vocab
from bigs_jax.errors import ConfigError
from bigs_jax.models import FAMILIES, MODELS, make_config
from bigs_jax.train import checkpointing


# The sections of every run config (`config.run_config`): a config.json holding them is ours.
_RUN_CONFIG_KEYS = {"objective", "model", "data", "optim", "train"}
# How deep a pre-marker eval output is searched for the run workdirs it holds
# (OUT/<task>/<mode>/lr<lr>/seed<k> for FPT).
_EVAL_DEPTH = 4


def check_workdir(workdir: str, kind: str = "run") -> str:
    """The workdir path (local: absolute; a gs://... URI: as given) after checking it can be
    written and is absent, empty or ours (of `kind`: "run" for the train loop, "eval" for
    eval.py's output), leaving nothing behind."""
    try:
        workdir = fs.resolve(workdir)
    except ValueError as e:
        raise ConfigError(f"workdir {e}") from None
    if fs.is_uri(workdir):
        if fs.scheme(workdir) != "gs":  # Orbax 0.12.8 writes arrays to GCS or local disks
            raise ConfigError(f"workdir {workdir}: Orbax writes checkpoints to local paths "
                              "and gs:// only; pass one of those to --workdir")
        _check_uri(workdir, kind)
        return workdir
    probe = workdir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"workdir {workdir} is under {probe}, which is a file; "
                          "pass a directory path to --workdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} is not writable ({probe} denies writes); "
                          "pass a writable --workdir")
    if probe == workdir:
        _check_ours(workdir, kind)
    else:  # permission bits do not tell all (/proc, a full or read-only mount): try it
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bigs_jax_probe_", dir=probe))
        except OSError as e:
            raise ConfigError(f"workdir {workdir} cannot be created under {probe} "
                              f"({e.strerror}); pass a writable --workdir") from None
    return workdir


@contextlib.contextmanager
def eval_output(out: str) -> Iterator[str]:
    """eval.py's output directory, checked (`check_workdir(out, "eval")`), created and marked.
    An evaluation that fails before writing anything else there removes what this made (the
    directory, or the marker of one that existed empty), so the disk is as it was."""
    out = check_workdir(out, "eval")
    existed = fs.exists(out)
    marker = fs.join(out, checkpointing.MARKER_JSON)
    marked = fs.exists(marker)
    fs.makedirs(out)
    if fs.is_primary():
        checkpointing.write_marker(out, "eval")
    try:
        yield out
    except BaseException:
        if (fs.is_primary() and not marked
                and fs.listdir(out) == [checkpointing.MARKER_JSON]):
            if existed:
                fs.remove(marker)
            else:
                fs.rmtree(out)
        raise


def _check_uri(workdir: str, kind: str) -> None:
    """`check_workdir` of a URI: an object store has no permissions to probe before writing,
    nor parents to create, so the workdir must be reachable and absent, empty or ours."""
    try:
        if fs.isdir(workdir):
            _check_ours(workdir, kind)
        elif fs.exists(workdir):
            raise ConfigError(f"workdir {workdir} is a file; pass a directory path to "
                              "--workdir")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- tf.errors, OSError, auth errors alike
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = (lines[0] if lines else type(e).__name__)[:240]
        raise ConfigError(f"workdir {workdir} cannot be read ({why}); check the bucket name "
                          "and the credentials (gcloud auth application-default login, or "
                          "the VM's service account)") from None


def _read_json(path: str):
    """The JSON object at `path`, or None if it is missing or not a JSON object."""
    try:
        data = fs.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_legacy_run(path: str) -> bool:
    """A run workdir written before the marker: our model.json or our config.json."""
    model = _read_json(fs.join(path, checkpointing.MODEL_JSON))
    if model is not None and model.get("family") in FAMILIES and isinstance(
            model.get("config"), dict):
        return True
    config = _read_json(fs.join(path, checkpointing.CONFIG_JSON))
    return config is not None and _RUN_CONFIG_KEYS <= set(config)


def _is_legacy_eval(path: str) -> bool:
    """An eval output written before the marker: results.json, or run workdirs below it."""
    if fs.isfile(fs.join(path, "results.json")):
        return True
    top = path.rstrip("/").count("/")
    for root, dirs, _ in fs.walk(path):
        if root.rstrip("/") != path.rstrip("/") and _is_legacy_run(root):
            return True
        if root.rstrip("/").count("/") - top >= _EVAL_DEPTH:
            dirs.clear()
        dirs[:] = [d for d in dirs if d != checkpointing.CHECKPOINTS]
    return False


def _check_ours(workdir: str, kind: str) -> None:
    """Refuse an existing, non-empty directory that is not a bigs_jax directory of `kind`."""
    try:
        entries = fs.listdir(workdir)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be read ({e.strerror}); pass a readable "
                          "--workdir") from None
    if not entries:
        return
    marker_path = fs.join(workdir, checkpointing.MARKER_JSON)
    marker = _read_json(marker_path)
    if marker is None and checkpointing.MARKER_JSON in entries:
        raise ConfigError(
            f"workdir {workdir} has a damaged {checkpointing.MARKER_JSON} (not a JSON object); "
            f"nothing was written; if the directory is ours, write "
            f"{{\"bigs_jax\": \"{kind}\", \"format\": {checkpointing.WORKDIR_FORMAT}}} into it, "
            "else pass an empty or new --workdir")
    if marker is not None and marker.get("bigs_jax") == kind:
        return
    if marker is not None and marker.get("bigs_jax"):
        why = f"it is a bigs_jax {marker['bigs_jax']!r} directory, not a {kind!r} one"
    elif (_is_legacy_run if kind == "run" else _is_legacy_eval)(workdir):
        return
    else:
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)"
                                          if len(entries) > 4 else "")
        why = (f"it is not empty ({shown}) and has no {checkpointing.MARKER_JSON} or run "
               "files of ours")
    raise ConfigError(f"workdir {workdir} is not a bigs_jax {kind} directory: {why}; nothing "
                      "was written; pass an empty or new --workdir")


# Run-config keys a resume may change without a word in the way: how long to train, how often
# to log, evaluate and save, what to evaluate on, the mesh (a checkpoint restores onto any mesh)
# and the model section (prepare_workdir compares the frozen model configs itself). The rest
# (optim, data, objective, seeds, growth) shaped the checkpoints already written.
_RESUMABLE = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.dry_run", "train.peak_flops_per_device",
              "train.profile_start_step", "train.profile_num_steps", "train.log_grad_norm",
              "train.eval_at_start", "train.allow_config_change", "train.grad_accum_steps",
              "train.compilation_cache_dir", "train.stacked_update",
              "data.eval_batches", "data.eval_batch_size"}
_RESUMABLE_SECTIONS = {"mesh", "model"}
HISTORY_JSON = "config_history.json"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# What a run's config says about where the run is rather than what it is: its scores go into
# its own directory, which may have moved along with the output directory around it.
_LOCATION = {"data.scores_dir"}


def config_changes(workdir: str, config: ConfigDict) -> dict:
    """{dotted key: [stored, new]} of the values that differ from the workdir's config.json
    (keys it lacks, added to the schema after it was written, are not changes; nor is where
    the run's own scores go)."""
    path = fs.join(workdir, checkpointing.CONFIG_JSON)
    stored = _read_json(path)
    if stored is None:
        if fs.exists(path):
            raise ConfigError(f"workdir {workdir} has a {checkpointing.CONFIG_JSON} that cannot "
                              "be read as a JSON object; nothing was written; restore it, or "
                              "remove it to record this run's config there")
        return {}
    changes = config_diff(stored, json.loads(json.dumps(config.to_dict())))
    return {k: v for k, v in changes.items() if k not in _LOCATION}


def config_diff(old: dict, new: dict) -> dict:
    """{dotted key: [old value, new value]} of the keys both nested dicts hold, where the
    values differ."""
    a, b = _flat(old), _flat(new)
    return {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def check_resume_config(workdir: str, config: ConfigDict) -> dict:
    """The changes against the workdir's config.json; ConfigError if any would alter what the
    checkpoints were trained with, unless `config.train.allow_config_change`."""
    changes = config_changes(workdir, config)
    shaping = [k for k in changes
               if k not in _RESUMABLE and k.split(".")[0] not in _RESUMABLE_SECTIONS]
    if shaping and not config.train.get("allow_config_change", False):
        shown = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in shaping)
        raise ConfigError(
            f"workdir {workdir} holds a run trained with other settings ({shown}); nothing was "
            "written; use a new --workdir, the original values, or "
            "--config.train.allow_config_change=True to continue with the new ones (recorded "
            f"in {HISTORY_JSON})")
    return changes


def _record_changes(workdir: str, changes: dict) -> None:
    """Append a resume's config changes to config_history.json, oldest first."""
    path = fs.join(workdir, HISTORY_JSON)
    history = _read_json(path) or {"changes": []}
    history["changes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "changed": changes})
    checkpointing.write_json_atomic(path, history)


def model_config_from(config: ConfigDict, data_overrides: Optional[dict] = None):
    """The frozen model config of a run.

    `config.model` names a registry entry (name + overrides). With `config.init` the
    architecture comes from that workdir's model.json instead, and `config.model` keys that are
    set (head, num_labels, dropout, ...) override it. `data_overrides` are what the data fixes
    (vocab_size, num_labels, image size): they win over the registry's values, and must agree
    with an `init` checkpoint's vocabulary.
    """
    data_overrides = dict(data_overrides or {})
    spec = MODELS.get(config.model.name)
    family = FAMILIES.get(spec.family if spec else config.model.name)
    if family is not None and family.config_from_run is not None:
        # Wrapper families (FPT) build their config from the whole run config.
        try:
            return family.config_from_run(config, data_overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model: {e}") from None
    overrides = {k: v for k, v in config.model.items() if k != "name" and v is not None}
    if config.init:
        base = checkpointing.read_model_config(checkpointing.resolve(config.init)[0])
        vocab = data_overrides.pop("vocab_size", None)
        if vocab is not None and vocab != getattr(base, "vocab_size", vocab):
            raise ConfigError(
                f"config.init {config.init} has a vocabulary of {base.vocab_size} ids but the "
                f"data's has {vocab}; use the checkpoint's vocabulary for config.data")
        try:
            return dataclasses.replace(base, **{**overrides, **data_overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model (over config.init {config.init}): {e}") from None
    for key, value in data_overrides.items():
        overrides.setdefault(key, value)
    if "max_len" not in overrides and "seq_len" in config.data:
        overrides["max_len"] = config.data.seq_len
    try:
        return make_config(config.model.name, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def check_same_model(workdir: str, model_config) -> None:
    """Refuse a workdir whose model.json holds another model (checked before its checkpoints
    are read, so a different model is never mistaken for a damaged checkpoint)."""
    path = fs.join(workdir, checkpointing.MODEL_JSON)
    if fs.exists(path):
        try:
            existing = checkpointing.read_model_config(workdir)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"workdir {workdir} has an unreadable {checkpointing.MODEL_JSON} "
                              f"({e}); restore it or use a new --workdir") from None
        # scan_layers changes how the blocks run, not the parameters: a resume may switch it
        if "scan_layers" in {f.name for f in dataclasses.fields(existing)}:
            existing = dataclasses.replace(
                existing, scan_layers=getattr(model_config, "scan_layers", False))
        if existing != model_config:
            changed = sorted(f.name for f in dataclasses.fields(existing)
                             if getattr(existing, f.name) != getattr(model_config, f.name, None))
            raise ConfigError(f"workdir {workdir} holds a run of a different model (differs in "
                              f"{changed}); use a new --workdir or the original config")


def prepare_workdir(workdir: str, config: ConfigDict, model_config) -> None:
    """Write the marker, config.json and model.json (a resume's config changes appended to
    config_history.json); a workdir of a different model or with changed settings is
    refused."""
    path = fs.join(workdir, checkpointing.MODEL_JSON)
    check_same_model(workdir, model_config)
    changes = check_resume_config(workdir, config)
    fs.makedirs(workdir)
    if fs.is_primary():
        checkpointing.write_marker(workdir)
        if changes:
            _record_changes(workdir, changes)
        checkpointing.write_json_atomic(fs.join(workdir, checkpointing.CONFIG_JSON),
                                        config.to_dict())
        checkpointing.write_json_atomic(path, checkpointing.model_json(model_config))


def record_vocabulary(workdir: str, vocabulary) -> None:
    """Write `vocabulary`'s files into `workdir/tokenizer/` (vocab.txt or spm.model), so
    eval.py and `data.tasks.load_vocabulary` find the ids the model was trained on. A workdir
    that records one already (a resume, a converted model's) keeps it."""
    files = vocab.vocabulary_files(vocabulary) if vocabulary is not None else {}
    if not files or not fs.is_primary() or vocab.workdir_vocabulary_file(workdir):
        return
    fs.makedirs(fs.join(workdir, vocab.TOKENIZER_DIR))
    for name, data in files.items():
        fs.write_bytes(fs.join(workdir, vocab.TOKENIZER_DIR, name), data)
