"""BERT masked-LM pretraining (Devlin et al. 2018), any size, on a SeqIO MLM task.

    python train.py --config=configs/bert.py:size=small --workdir=workdirs/bert-small
    python train.py --config=configs/bert.py:size=base --workdir=/path/to/run \
        --config.data.task=YOUR_MLM_TASK

Sizes: tiny, small (CPU), base (110M), large (340M). The loss is cross-entropy on every
selected position (15%; 80/10/10), computed only at `train.max_predictions` positions per row
(20 at L=128, as BERT did), no NSP. The default task is the embedded corpus (no download),
enough for the CPU sizes tiny and small (300 steps of 32 x 128 tokens); register a
large-corpus MLM task for base and large. Large-scale settings follow the 24h-BERT /
academic-budget recipe BiGS also used: AdamW, β = (0.9, 0.98), eps 1e-6, weight decay 0.01,
warmup then cosine decay.
`get_config("smoke")` (tiny, 6 steps) is what CI runs.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size, smoke

SIZES = ("tiny", "small", "base", "large")
LR = {"tiny": 2e-3, "small": 1e-3, "base": 1e-3, "large": 6e-4}
MAX_PREDICTIONS_PER_128 = 20


def get_config(arg=None):
    args = parse_arg(arg, ("size", "seq_len", "smoke"))
    size = pick_size(args, SIZES, "base")
    c = base_config(model=f"bert-{size}", task="embedded_mlm", objective="mlm")
    c.optim.lr = LR[size]
    c.data.seq_len = int(args.get("seq_len", 128))
    c.train.max_predictions = -(-MAX_PREDICTIONS_PER_128 * c.data.seq_len // 128)
    if size in ("base", "large"):
        c.data.batch_size = 4096 if size == "large" else 1024
        c.optim.warmup_steps = 2000
        c.train.steps = 100_000
        c.train.eval_every = 1000
        c.train.checkpoint_every = 1000
    else:
        c.data.batch_size = 32
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.train.eval_every = 50
        c.train.checkpoint_every = 100
    if args.get("smoke"):
        smoke(c)
    return c
