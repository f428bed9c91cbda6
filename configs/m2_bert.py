"""M2-BERT masked-LM pretraining (Monarch Mixer, Fu et al. 2023, arXiv 2310.12109).

    python train.py --config=configs/m2_bert.py:size=tiny --workdir=workdirs/m2-bert-tiny
    python train.py --config=configs/m2_bert.py:size=80m --workdir=/path/to/run \
        --config.data.task=YOUR_MLM_TASK

Sizes 80m, 110m, 260m, 341m are the released models (12 layers, L=128, vocab 30528) with the
official recipe (research/m2.md §2.5): MLM rate 0.30, decoupled AdamW lr 8e-4,
β = (0.9, 0.98), eps 1e-6, weight decay 1e-5, linear warmup over 6% then linear decay to
0.02×, clipping 1.0, global batch 4096; the filter MLPs train at lr 1e-3 with weight decay
0.1 and the positional features z at lr 1e-5. Sizes tiny and small run on a CPU on the
embedded corpus. `get_config("smoke")` (tiny, 6 steps) is what CI runs.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size, smoke

SIZES = ("tiny", "small", "80m", "110m", "260m", "341m")
BASE_LR = 8e-4
# Filter-parameter groups (research/m2.md §2.5), as multiples of the base lr.
FILTER_MLP = r"/filter_fn2?/(implicit_filter|implicit_filter_rev)/"
FILTER_Z = r"/filter_fn2?/z$"


def get_config(arg=None):
    args = parse_arg(arg, ("size", "smoke"))
    size = pick_size(args, SIZES, "80m")
    c = base_config(model=f"m2-bert-{size}", task="embedded_mlm", objective="mlm")
    c.data.mask_rate = 0.30
    c.data.seq_len = 128
    c.train.max_predictions = 48  # 0.30·128 = 38.4 on average; 48 covers the tail
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.02
    c.optim.groups = [
        {"pattern": FILTER_MLP, "lr_scale": 1e-3 / BASE_LR, "weight_decay": 0.1},
        {"pattern": FILTER_Z, "lr_scale": 1e-5 / BASE_LR, "weight_decay": 0.0},
    ]
    if size in ("tiny", "small"):
        c.optim.lr = 4e-3
        c.optim.weight_decay = 0.01
        c.optim.warmup_steps = 30
        c.data.batch_size = 32
        c.train.steps = 600
        c.train.eval_every = 50
        c.train.checkpoint_every = 100
    else:
        c.optim.lr = BASE_LR
        c.optim.weight_decay = 1e-5
        c.train.steps = 70_000  # 286.7M samples at batch 4096
        c.optim.warmup_steps = int(0.06 * c.train.steps)
        c.data.batch_size = 4096
        c.train.eval_every = 2000
        c.train.checkpoint_every = 2000
    if args.get("smoke"):
        smoke(c)
    return c
