"""The run-config schema (ml_collections) and the helpers configs/ build experiments with.

`run_config` is the one schema the train loop reads: every key of `optim`, `train` and `mesh`
has its default here, so the loop never guesses one. Pretraining configs start from
`base_config`; the GLUE/SCROLLS runner (`evals.runner.run_config`) starts from `run_config`
with its benchmark's data section and overrides values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Optional, Sequence

from ml_collections import ConfigDict, config_dict

from bigs_jax.errors import ConfigError
from bigs_jax.models import FAMILIES, get_spec
from bigs_jax.train.partitioning import DEFAULT_RULES

# Biases, LayerNorm parameters and the SSM parameters' D are excluded from weight decay, as in
# the official BiGS pretraining script (bias and LayerNorm scale) and BERT.
NO_DECAY = (r"(^|/)bias$", r"norm/(scale|bias)$")
# The S4D parameters of every layer; research/bigs.md §1.3 and §4.5 (0.1x lr, no decay in
# annotated-s4/S5; the official BiGS script uses the base lr).
SSM_PARAMS = r"(^|/)(fs4|bs4)/(A_re|A_im|log_step)$"


def parse_arg(arg: Optional[str], keys: Sequence[str]) -> dict:
    """'size=large,smoke' → {'size': 'large', 'smoke': True}; `keys` are the names the
    config accepts, and any other (a typo such as `smok` or `sise`) raises ValueError."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in keys:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: "
                             f"{', '.join(keys)} (as :key=value,flag)")
        out[key] = value.strip() if value else True
    return out


def pick_size(args: dict, sizes, default: str, smoke_size: str = "tiny") -> str:
    """The `size=` of a config argument (`smoke_size` under `smoke`), checked against `sizes`."""
    size = smoke_size if args.get("smoke") else args.get("size", default)
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; choose one of {list(sizes)}")
    return size


def _field_type(hint) -> type:
    """int for `int` and `Optional[int]`; the type ml_collections parses a flag value as."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def model_config(name: str, **values) -> ConfigDict:
    """`config.model`: the registry name plus one key per field of the family's config.

    Keys left None take the registry's value for `name`, so `--config.model.X=...` works for
    every model option while `--config.model.name=...` still picks up that size's defaults.
    """
    cls = FAMILIES[get_spec(name).family].config_cls
    hints = typing.get_type_hints(cls)
    c = ConfigDict({"name": name})
    for field in dataclasses.fields(cls):
        c[field.name] = config_dict.placeholder(_field_type(hints[field.name]))
    for key, value in values.items():
        c[key] = value
    return c


def mesh_config() -> ConfigDict:
    """The default mesh: data parallel over every device, with the default sharding rules."""
    return ConfigDict({"shape": (-1, 1, 1), "dcn_shape": (1, 1, 1),
                       "rules": [list(r) for r in DEFAULT_RULES]})


def optim_config() -> ConfigDict:
    """`config.optim`: AdamW with warmup, decay, clipping and path-regex groups (`optim.py`)."""
    return ConfigDict({
        "lr": 1e-3, "warmup_steps": 100, "schedule": "cosine", "end_lr_ratio": 0.1,
        "b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": 0.01, "clip_norm": 1.0,
        "no_decay": list(NO_DECAY), "groups": [], "freeze": [],
    })


def train_config() -> ConfigDict:
    """`config.train`: every key the train loop reads, with its default."""
    return ConfigDict({
        "steps": 1000, "log_every": 10, "eval_every": 100, "checkpoint_every": 100,
        "keep_checkpoints": 3, "seed": 0, "max_predictions": 0, "grad_accum_steps": 1,
        "dry_run": False, "peak_flops_per_device": 0.0,
        "profile_start_step": 0, "profile_num_steps": 5,
        # The gradient norm in the logs costs ~7% of a small model's step on CPU.
        "log_grad_norm": True,
        # The optimizer update on each layer stack's parameters stacked (layer_stack.py): with
        # scan_layers, the step compiles ~3x faster than unrolled, but copies the params,
        # gradients and moments into and out of the stacked view (+16-30% step time, +1.6x
        # params bytes of temporaries, bigs-large / bert-large at batch 8 x 128 on CPU). The
        # same updates up to the last bit.
        "stacked_update": False,
        "eval_at_start": True,  # evaluate before the first step of a fresh run
        # Resume although the optimizer/data settings differ from the workdir's config.json
        # (the change is recorded in config_history.json; workdir.check_resume_config).
        "allow_config_change": False,
        # jax's persistent compilation cache (local or gs://...; '' = jax's own setting, off
        # unless JAX_COMPILATION_CACHE_DIR is set): reruns and resumes skip compiling.
        "compilation_cache_dir": "",
    })


# The least value of each key that a run can use (0 = off, e.g. no warmup, no clipping).
_LOWEST = {
    "train": {"steps": 1, "log_every": 1, "eval_every": 1, "checkpoint_every": 1,
              "keep_checkpoints": 1, "grad_accum_steps": 1, "max_predictions": 0,
              "profile_start_step": 0, "profile_num_steps": 0},
    "data": {"batch_size": 1, "eval_batch_size": 1, "eval_batches": 0, "seq_len": 0},
    "optim": {"lr": 0, "warmup_steps": 0, "end_lr_ratio": 0, "weight_decay": 0,
              "clip_norm": 0, "eps": 0, "b1": 0, "b2": 0},
}
# Keys that must also stay below a bound (Adam's betas are < 1).
_BELOW = {"optim": {"b1": 1, "b2": 1}}


def check_values(config: ConfigDict) -> None:
    """Raise ConfigError naming every value no run can use (steps <= 0, lr < 0, ...)."""
    problems = []
    for section, lowest in _LOWEST.items():
        values = config.get(section) or {}
        for key, low in lowest.items():
            value = values.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            high = _BELOW.get(section, {}).get(key)
            if not math.isfinite(value) or value < low or (high is not None and value >= high):
                bound = f">= {low}" if high is None else f"in [{low}, {high})"
                problems.append(f"config.{section}.{key}={value} (must be {bound})")
    # The step splits each batch into grad_accum_steps microbatches of equal size.
    batch = (config.get("data") or {}).get("batch_size")
    accum = (config.get("train") or {}).get("grad_accum_steps")
    if isinstance(batch, int) and isinstance(accum, int) and accum >= 1 and batch % accum:
        problems.append(f"config.data.batch_size={batch} is not divisible by "
                        f"config.train.grad_accum_steps={accum}")
    if problems:
        raise ConfigError(f"impossible config values: {'; '.join(problems)}; pass values in "
                          "range with --config.<section>.<key>=...")


def seqio_data_config(task: str) -> ConfigDict:
    """`config.data` of a SeqIO task or mixture (`data.seqio_source`)."""
    return ConfigDict({
        "source": "seqio",
        "task": task, "seq_len": 128, "batch_size": 32, "eval_batch_size": 32,
        "eval_split": "validation", "eval_batches": 0, "mask_rate": 0.15, "seed": 0,
        "whole_word": False,
        # Stream the task (data.streaming) instead of holding its split in host memory:
        # for corpora larger than data.pipeline._MAX_TOKENS_IN_MEMORY.
        "streaming": False, "shuffle_buffer": 10_000,
    })


def run_config(*, model: ConfigDict, data: ConfigDict, objective: str,
               init: str = "") -> ConfigDict:
    """The one schema of a train-loop run: every section with every key's default.

    `data` is the section of the source `data.source` names (each source has its own keys);
    the other sections are the same for every run, pretraining or fine-tuning.
    """
    c = ConfigDict()
    c.objective = objective
    # A workdir (or workdir/checkpoints/<step>) to start from: its architecture and every
    # parameter this run's model shares with it (fine-tuning; see checkpointing.restore_matching).
    c.init = init
    c.model = model
    c.data = data
    c.optim = optim_config()
    c.train = train_config()
    c.mesh = mesh_config()
    # Function-preserving growth schedule (train/growth.py), a JSON list of
    # {"step": s, "<size field>": n, ...}, e.g. '[{"step": 200, "hidden_size": 256}]'; an entry's
    # "rewarm_steps": n ramps the lr from lr/n back to lr over the n updates after growth.
    c.growth = ""
    return c


# New pretraining runs pad the vocabulary to a multiple of 128 (`vocab_multiple`), so any
# vocabulary (GPT-2's 50257, BERT's 30522) splits over a tensor axis of up to 128 devices; the
# pad logits are masked and exports drop the rows. Models built by `create` or converted keep 1.
VOCAB_MULTIPLE = 128


def base_config(*, model: str, task: str, objective: str) -> ConfigDict:
    """A pretraining run of registry model `model` on SeqIO task `task`."""
    c = run_config(model=model_config(model), data=seqio_data_config(task),
                   objective=objective)
    if "vocab_multiple" in c.model:
        c.model.vocab_multiple = VOCAB_MULTIPLE
    return c


def add_finetune_sections(c: ConfigDict, tasks, model_options: dict[str, type]) -> None:
    """The sections the GLUE and SCROLLS configs share: `model` (options over the
    checkpoint's; None keeps its value), `per_task` overrides and `mesh`."""
    c.model = ConfigDict({k: config_dict.placeholder(t) for k, t in model_options.items()})
    c.per_task = ConfigDict({t: {
        "lr": config_dict.placeholder(float), "epochs": config_dict.placeholder(float),
        "max_steps": config_dict.placeholder(int), "batch_size": config_dict.placeholder(int),
        "max_len": config_dict.placeholder(int)} for t in tasks})
    c.mesh = mesh_config()


def smoke(c: ConfigDict) -> ConfigDict:
    """Shrink a run to the CI size: 6 steps of batch 8, evaluated and checkpointed twice."""
    c.data.batch_size = 8
    c.data.eval_batches = 2
    c.train.steps = 6
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
    return c
