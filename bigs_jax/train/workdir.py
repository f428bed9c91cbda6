"""A run's workdir and model: checked before anything is written, then recorded in it.

`check_workdir` refuses a path that cannot be written; `model_config_from` resolves the frozen
model config of a run (registry entry, `config.init` checkpoint, what the data fixes);
`prepare_workdir` writes config.json and model.json, refusing a workdir of another model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
from ml_collections import ConfigDict

from bigs_jax.errors import ConfigError
from bigs_jax.models import FAMILIES, MODELS, make_config
from bigs_jax.train import checkpointing


def check_workdir(workdir: str) -> str:
    """Absolute workdir path after checking it can be written, creating nothing."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    probe = workdir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"workdir {workdir} is under {probe}, which is a file; "
                          "pass a directory path to --workdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} is not writable ({probe} denies writes); "
                          "pass a writable --workdir")
    return workdir


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


def prepare_workdir(workdir: str, config: ConfigDict, model_config) -> None:
    """Write config.json and model.json; a workdir of a different model is refused."""
    path = os.path.join(workdir, checkpointing.MODEL_JSON)
    if os.path.exists(path):
        existing = checkpointing.read_model_config(workdir)
        if existing != model_config:
            changed = sorted(f.name for f in dataclasses.fields(existing)
                             if getattr(existing, f.name) != getattr(model_config, f.name, None))
            raise ConfigError(f"workdir {workdir} holds a run of a different model (differs in "
                              f"{changed}); use a new --workdir or the original config")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        checkpointing.write_json_atomic(os.path.join(workdir, checkpointing.CONFIG_JSON),
                                        config.to_dict())
        checkpointing.write_json_atomic(path, checkpointing.model_json(model_config))
