"""Optimizer-state policies after growth: size of the new entries' Adam updates vs the old ones'.

    python bench/growth_policies.py [--b2 0.98,0.999] [--policies zero,own_count,nu_mean,nu_median]

GPT-2 tiny (vocab 512, no dropout) trained 300 steps (AdamW, constant lr 3e-3) on a learnable
synthetic sequence task, grown (MLP 256→512, hidden 64→128 by mean-fill, layers 2→3) by
`bigs_jax.train.growth.grow_state` with each policy, then trained 100 more steps. Prints, at
steps 1, 2, 3, 5, 10, 30, 100 after growth, the median |update| of new entries divided by that
of old entries in three tensors (layers/0/mlp/up, layers/1/mlp/up, layers/0/mixer/query
kernels) and the train loss. The table in bigs_jax/train/growth.py comes from this script.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bigs_jax  # noqa: E402
from bigs_jax import growth  # noqa: E402
from bigs_jax.train import config as train_config  # noqa: E402
from bigs_jax.train import growth as train_growth  # noqa: E402
from bigs_jax.train import optim  # noqa: E402
from bigs_jax.train.objectives import OBJECTIVES  # noqa: E402
from bigs_jax.train.step import TrainState, make_train_step  # noqa: E402

SIZES = dict(intermediate_size=512, num_layers=3, hidden_size=128)
TENSORS = ("layers/0/mlp/up/kernel", "layers/1/mlp/up/kernel", "layers/0/mixer/query/kernel")


def batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(0, 64, (8, 32))
        ids[:, 1::2] = (ids[:, ::2] * 7) % 64  # every other token is predictable
        weights = np.ones((8, 32), np.float32)
        weights[:, -1] = 0
        yield {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((8, 32), jnp.int32),
               "labels": jnp.asarray(np.roll(ids, -1, 1)), "loss_weights": jnp.asarray(weights)}


def measure(b2: float, policies: list[str]) -> None:
    config = bigs_jax.make_config("gpt2-tiny", dropout=0.0, attention_dropout=0.0,
                                  vocab_size=512)
    c = train_config.base_config(model="gpt2-tiny", task="x", objective="lm")
    c.optim.update(b2=b2, warmup_steps=0, schedule="constant", lr=3e-3)
    make_tx = lambda p: optim.make_optimizer(c.optim, p, 1000)[0]
    loss_fn = functools.partial(OBJECTIVES["lm"], max_predictions=0)
    params = nnx.to_pure_dict(nnx.state(bigs_jax.build(config)))
    tx = make_tx(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    data = batches()
    step = jax.jit(make_train_step(nnx.graphdef(bigs_jax.build(config)), tx, loss_fn))
    for _ in range(300):
        state, stats = step(state, next(data))
    print(f"beta2 {b2}: loss before growth {float(stats['loss']):.4f}")
    _, maps, _ = growth.index_maps(config, jax.device_get(state.params), **SIZES)
    for policy in policies:
        grown, new_config, tx2 = train_growth.grow_state(
            state, config, make_tx, policy=policy, betas=(0.9, b2), **SIZES)
        step2 = jax.jit(make_train_step(nnx.graphdef(bigs_jax.build(new_config)), tx2, loss_fn))
        prev, rows = growth._flat(grown.params), []
        data2 = batches(1)
        for t in range(1, 101):
            grown, stats = step2(grown, next(data2))
            cur = growth._flat(grown.params)
            if t in (1, 2, 3, 5, 10, 30, 100):
                ratios = []
                for k in TENSORS:
                    d, new = np.abs(cur[k] - prev[k]), maps[k] == 0
                    ratios.append(np.median(d[new]) / np.median(d[~new]))
                rows.append(f"{t}: " + " ".join(f"{r:.2f}" for r in ratios)
                            + f" (loss {float(stats['loss']):.3f})")
            prev = cur
        print(f"  {policy:9s} " + " | ".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b2", default="0.98,0.999")
    p.add_argument("--policies", default="zero,own_count,nu_mean,nu_median")
    args = p.parse_args()
    for b2 in args.b2.split(","):
        measure(float(b2), args.policies.split(","))


if __name__ == "__main__":
    main()
