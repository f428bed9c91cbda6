"""FPT (Lu et al. 2021): a frozen backbone with new input/output layers on the paper's tasks.

    python train.py --config=configs/fpt.py:task=bit-xor,backbone=gpt2-tiny --workdir=OUT
    python train.py --config=configs/fpt.py:task=listops --config.init=GPT2_WORKDIR \
        --workdir=OUT                      # pretrained GPT-2 (python -m bigs_jax.convert gpt2 ..)
    python train.py --config=configs/fpt.py:task=cifar10 --config.init=GPT2_WORKDIR \
        --config.fpt.pretrained=False      # the same architecture at random init
    python eval.py --config=configs/fpt.py --config.init=WORKDIR --workdir=OUT \
        --config.protocol.tasks=bit-memory,listops,digits   # lr sweep × seeds × 3 modes

Arguments (`:a=b,c=d`): task (bigs_jax.data.fpt_tasks.TASKS), backbone (a registry name used
when config.init is empty), mode=frozen|full (full: every parameter trains), the official
code's switches freeze_ln, freeze_pos, freeze_ff, freeze_attn (0/1; defaults 0, 0, 1, 1)
that set config.optim.freeze (bigs_jax.fpt.freeze_patterns), and smoke (a few steps).

The optimizer is the paper's: Adam, lr 1e-3, β = (0.9, 0.999), eps 1e-8, no weight decay,
gradient-norm clip 1.0, constant lr. Step counts and batch sizes are sized for CPU runs with
small backbones, not the paper's (it trained "to convergence", up to 1e6 steps of batch 2-16).
`config.fpt.pretrained` defaults to "config.init is set"; `False` with an init keeps the
architecture and draws the backbone at random (seed config.train.seed).

`config.data.augment` (default True, as the official code) augments the cifar10 and
cifar10-gray training batches: random crop (4-pixel zero padding), flip, rotation up to 20°.

`size=paper` (default) or `size=cpu` picks the task sizes (bigs_jax.data.fpt_tasks
.TASK_SETTINGS). `smoke`: bit-xor on gpt2-tiny, 6 steps (CI).

Measured on a shared 2-core CPU: bit-xor (1000 steps of 32) with the frozen converted
all-MiniLM-L6-v2 reaches 100% test bit accuracy (and every example exact) from step 250,
329 s; with a random frozen gpt2-tiny it is at 67% after the same 1000 steps (8 s).
"""

from ml_collections import ConfigDict, config_dict

from bigs_jax.data.fpt_tasks import apply_task_settings
from bigs_jax.fpt import freeze_patterns
from bigs_jax.train.config import base_config, parse_arg, smoke


def _flag(args: dict, key: str, default: bool) -> bool:
    value = args.get(key, default)
    if isinstance(value, bool):
        return value
    if value not in ("0", "1", "true", "false", "True", "False"):
        raise ValueError(f"{key}={value!r}: pass 0 or 1")
    return value in ("1", "true", "True")


def get_config(arg=None):
    args = parse_arg(arg, ("task", "size", "mode", "backbone", "freeze_ln", "freeze_pos",
                           "freeze_ff", "freeze_attn", "smoke"))
    task = args.get("task", "bit-xor")
    size = args.get("size", "paper")
    mode = args.get("mode", "frozen")
    if mode not in ("frozen", "full"):
        raise ValueError(f"unknown mode {mode!r}; choose frozen or full")
    c = base_config(model="fpt", task=task, objective="classification")
    c.model = ConfigDict({"name": "fpt"})
    c.fpt = ConfigDict({
        "backbone": args.get("backbone", "gpt2"),   # registry name, when config.init is empty
        "pretrained": config_dict.placeholder(bool),
        "mode": mode,
        "dropout": 0.1, "orth_gain": 1.41,
        "backbone_dropout": config_dict.placeholder(float),  # None: the backbone's own
        "scan_layers": config_dict.placeholder(bool),  # None: the backbone's own
    })
    switches = {k: _flag(args, k, d) for k, d in (("freeze_ln", False), ("freeze_pos", False),
                                                   ("freeze_ff", True), ("freeze_attn", True))}
    c.fpt.update(switches)

    for key in ("mask_rate", "whole_word", "streaming", "shuffle_buffer"):
        del c.data[key]
    c.data.update({
        "source": "fpt", "seq_len": 0, "batch_size": 32,
        "eval_batch_size": 100, "eval_split": "validation", "eval_batches": 0,
        "generator_seed": 0,          # fixed data (generated sets, image validation carve)
        "scores_dir": "",             # where `score` writes dev/step_N.json ("" = nowhere)
        # bit tasks: the official sizes
        "n_bits": 5, "num_patterns": 5, "patch_size": 1,
        "eval_examples": 1000,
        # listops: generate (LRA's definition) or lra (basic_*.tsv in data_dir)
        "listops_source": "generate", "listops_train": 20000, "listops_eval": 2000,
        "listops_min_length": 20, "listops_max_length": 120, "listops_parens": False,
        # images and homology
        "data_dir": "", "val_fraction": 0.1,
        # remote-homology: leave out sequences longer than seq_len, as the official code
        # does (skip), or cut them (truncate)
        "long_sequences": "skip",
        # cifar10, cifar10-gray: the official training augmentation (crop, flip, rotation)
        "augment": True,
    })
    c.optim.update({
        "lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "end_lr_ratio": 1.0,
        "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "clip_norm": 1.0,
        "no_decay": [], "groups": [],
        "freeze": freeze_patterns(**switches) if mode == "frozen" else [],
    })
    c.train.keep_checkpoints = 1
    c.train.eval_at_start = True
    apply_task_settings(c, task, size)
    c.protocol = ConfigDict({
        "tasks": "bit-memory,listops,digits",
        "modes": "pretrained,random,full",   # frozen pretrained, frozen random, full fine-tune
        "lrs": "1e-4,3e-4,1e-3,3e-3",        # log-spaced; the paper's 1e-3 is in the middle
        "seeds": "0,1,2",
        "size": size,                        # TASK_SETTINGS of every task
        "sweep": "all",                      # all: every lr × seed; first_seed: see evals/fpt
        "steps": config_dict.placeholder(int),    # None: each task's default
        # the task and size whose TASK_SETTINGS this config holds: a flag that changes one
        # of them is refused by the protocol, which sets them per task (bigs_jax/evals/fpt.py)
        "settings_of": f"{task},{size}",
    })
    c.benchmark = "fpt"
    if args.get("smoke"):
        smoke(c)
        c.data.eval_examples = 16
        c.data.eval_batch_size = 8
        c.data.listops_train, c.data.listops_eval = 64, 16
        c.data.val_fraction = 0.1
        if c.fpt.backbone == "gpt2":
            c.fpt.backbone = "gpt2-tiny"
    return c
