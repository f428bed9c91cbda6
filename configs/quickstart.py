"""The README's default run: a small BiGS masked LM on the embedded corpus, on CPU.

    python train.py        # = --config=configs/quickstart.py --workdir=workdirs/quickstart

Expect the held-out MLM loss to fall by well over 30% from its step-0 value within a few
minutes on a 2-core CPU; checkpoints and TensorBoard events land in the workdir. Running the
same command again resumes from the latest checkpoint. `get_config("smoke")` is the CI size.
"""

from bigs_jax.train.config import base_config, parse_arg, smoke


def get_config(arg=None):
    args = parse_arg(arg, ("smoke",))
    c = base_config(model="bigs-small", task="embedded_mlm", objective="mlm")
    c.model.hidden_size = 128
    c.model.num_layers = 2
    c.model.intermediate_size = 384
    c.model.dropout = 0.0  # a few minutes on ~0.4M tokens: the run is far from overfitting
    c.data.batch_size = 32
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 50
    c.train.steps = 1000
    c.train.eval_every = 100
    c.train.checkpoint_every = 250
    c.train.max_predictions = 32  # covers the ~19 selected of 126 tokens in > 99.9% of rows
    if args.get("smoke"):
        c.model.hidden_size = 64
        c.model.intermediate_size = 128
        c.model.ssm_state = 16
        smoke(c)
    return c
