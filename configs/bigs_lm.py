"""Causal gated-SSM LM pretraining: the BiGS block with the forward SSM only (models/bigs_lm.py).

    python train.py --config=configs/bigs_lm.py:size=mini --workdir=workdirs/bigs-lm-mini
    python train.py --config=configs/bigs_lm.py:size=small --workdir=/path/to/run \
        --config.data.task=YOUR_LM_TASK

No released causal BiGS exists; the sizes pair GPT-2's widths and depths with BiGS's gate width
(F = 3·D) and state size: tiny and mini (CPU), small (D=768, 12 layers), medium (D=1024, 24
layers). The recipe is configs/gpt2.py's (nanoGPT/GPT-3: AdamW β = (0.9, 0.95), weight decay
0.1, cosine decay after warmup, clipping at 1.0) on the same causal-LM tasks, so the two train
side by side; the S4D parameters get no weight decay (the S4 practice; their C is a matrix the
default decay mask would otherwise reach). `bigs_jax.generate` decodes the trained model with
its recurrent state, constant time per token. With `size=mini` (200 steps of 16 x 128 tokens
on the embedded corpus) the held-out loss fell 9.07 -> 5.58 (-38.5%) in 211 s on a shared
2-core CPU (2026-12-05). `get_config("smoke")` (tiny, 6 steps) is what CI runs.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size, smoke

SIZES = ("tiny", "mini", "small", "medium")
LR = {"tiny": 3e-3, "mini": 1.5e-3, "small": 6e-4, "medium": 3e-4}
SSM_PARAMS = r"/fs4/"


def get_config(arg=None):
    args = parse_arg(arg, ("size", "smoke"))
    size = pick_size(args, SIZES, "small")
    c = base_config(model=f"bigs-lm-{size}", task="embedded_lm", objective="lm")
    c.optim.lr = LR[size]
    c.optim.b2, c.optim.eps = 0.95, 1e-8
    c.optim.weight_decay = 0.1
    c.optim.groups = [{"pattern": SSM_PARAMS, "lr_scale": 1.0, "weight_decay": 0.0}]
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
        c.train.steps = 200
        c.train.eval_every = 50
        c.train.checkpoint_every = 100
    if args.get("smoke"):
        smoke(c)
    return c
