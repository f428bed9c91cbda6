"""M2-GPT causal-LM pretraining (Monarch Mixer, Fu et al. 2023, arXiv 2310.12109).

    python train.py --config=configs/m2_gpt.py:size=mini --workdir=workdirs/m2-gpt-mini
    python train.py --config=configs/m2_gpt.py:size=small,nomlp --workdir=/path/to/run \
        --config.data.task=YOUR_LM_TASK

No official M2-GPT code or config exists (research/m2.md §2.7). The model is the M2 layer
with causal long convolutions and a tied LM head; `nomlp` selects the MLP-free variant. Sizes
follow GPT-2's widths and depths: tiny and mini (CPU), small (D=768, 12 layers), medium
(D=1024, 24 layers). The recipe is the nanoGPT/GPT-3 one of configs/gpt2.py, with the M2
filter groups of configs/m2_bert.py. `get_config("smoke")` (tiny, 6 steps) is what CI runs.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size, smoke

SIZES = ("tiny", "mini", "small", "medium")
LR = {"tiny": 3e-3, "mini": 1.5e-3, "small": 6e-4, "medium": 3e-4}
FILTER_MLP = r"/filter_fn2?/implicit_filter/"
FILTER_Z = r"/filter_fn2?/z$"


def get_config(arg=None):
    args = parse_arg(arg, ("size", "nomlp", "smoke"))
    size = pick_size(args, SIZES, "small")
    c = base_config(model=f"m2-gpt-{size}" + ("-nomlp" if args.get("nomlp") else ""),
                    task="embedded_lm", objective="lm")
    c.optim.lr = LR[size]
    c.optim.b2, c.optim.eps = 0.95, 1e-8
    c.optim.weight_decay = 0.1
    c.optim.groups = [
        {"pattern": FILTER_MLP, "lr_scale": 1.0, "weight_decay": 0.0},
        {"pattern": FILTER_Z, "lr_scale": 0.01, "weight_decay": 0.0},
    ]
    c.optim.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.data.seq_len = 1024
    c.data.batch_size = 512
    if size in ("tiny", "mini"):
        c.data.seq_len = 128
        c.data.batch_size = 16
        c.optim.warmup_steps = 20
        c.train.steps = 500
        c.train.eval_every = 50
        c.train.checkpoint_every = 100
    if args.get("smoke"):
        smoke(c)
    return c
