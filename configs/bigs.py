"""BiGS masked-LM pretraining ("Pretraining Without Attention", Wang et al. 2022).

    python train.py --config=configs/bigs.py:size=small --workdir=workdirs/bigs-small
    python train.py --config=configs/bigs.py:size=large --workdir=/path/to/run \
        --config.data.task=YOUR_MLM_TASK

`size=large` is the released model (23 gated layers, D=1024, F=3072, N=64, L=128) with the
official recipe (research/bigs.md §1.8): AdamW lr 6e-4, β = (0.9, 0.98), eps 1e-6, weight
decay 0.05 on everything but biases and LayerNorm scales (the official script decays the SSM
parameters too), 2000 warmup steps, cosine decay to 10% over 100k steps, 20 predictions per row
at L=128, dropout 0.1 after the embeddings only. The paper's batch is 760 × 128 tokens; set
data.batch_size to what the mesh holds. `seq_len=512` (etc.) sets the length.

Sizes tiny and small run on a CPU on the embedded corpus (300 steps of 32 x 128 tokens);
configs/quickstart.py is the smaller, faster README run. `get_config("smoke")` is what CI runs.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size, smoke

SIZES = ("tiny", "small", "base", "large")
MAX_PREDICTIONS_PER_128 = 20


def get_config(arg=None):
    args = parse_arg(arg, ("size", "seq_len", "smoke"))
    size = pick_size(args, SIZES, "large")
    c = base_config(model=f"bigs-{size}", task="embedded_mlm", objective="mlm")
    c.data.seq_len = int(args.get("seq_len", 128))
    c.train.max_predictions = -(-MAX_PREDICTIONS_PER_128 * c.data.seq_len // 128)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.1
    if size in ("base", "large"):
        c.optim.lr = 6e-4
        c.optim.weight_decay = 0.05
        c.optim.warmup_steps = 2000
        c.data.batch_size = 760
        c.train.steps = 100_000
        c.train.eval_every = 1000
        c.train.checkpoint_every = 1000
    else:
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 30
        c.data.batch_size = 32
        c.train.steps = 300
        c.train.eval_every = 50
        c.train.checkpoint_every = 100
    if args.get("smoke"):
        smoke(c)
    return c
