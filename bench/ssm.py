"""One BiGS layer vs one BERT layer, forward, as the sequence grows.

    python bench/ssm.py [--lengths 512,1024,2048,4096,8192] [--repeats 5]

Batch 1, hidden 1024 (BiGS: intermediate 3072, N = 64, shared SSMs, FFT path; BERT:
intermediate 4096, 16 heads), fp32, jitted, medians of `repeats` timed calls after one warm-up.
Prints each layer's time, the BiGS/BERT ratio, and the growth time(L)/time(first L) of each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.models import make_config
from bigs_jax.models.encoder import GatedBlock, StackBlock
from bigs_jax.layers.attention import make_attention_mask


def layer_fn(block_cls, config):
    graphdef, state = nnx.split(block_cls(config, rngs=nnx.Rngs(0)))

    @jax.jit
    def forward(state, x_BLD, mask_BL):
        layer = nnx.merge(graphdef, state)
        return layer(x_BLD, mask_BL, make_attention_mask(mask_BL, x_BLD.shape[1]))

    return lambda x, m: forward(state, x, m)


def median_time(fn, x, mask, repeats: int) -> float:
    jax.block_until_ready(fn(x, mask))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, mask))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    common = dict(max_len=max(lengths), dropout=0.0, attention_dropout=0.0)
    bigs = layer_fn(GatedBlock, make_config("bigs-large", **common))
    bert = layer_fn(StackBlock, make_config("bert-large", **common))
    print(f"# bench/ssm.py  {datetime.date.today()}  jax {jax.__version__}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"backend {jax.default_backend()}")
    print(f"# batch 1, hidden 1024, fp32, median of {args.repeats} repeats after warm-up")
    print("| L | BiGS layer (ms) | BERT layer (ms) | BiGS / BERT | BiGS growth | BERT growth |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for L in lengths:
        x = jax.random.normal(jax.random.key(0), (1, L, 1024))
        mask = jnp.ones((1, L), jnp.int32)
        t_bigs = median_time(bigs, x, mask, args.repeats)
        t_bert = median_time(bert, x, mask, args.repeats)
        base = base or (t_bigs, t_bert)
        print(f"| {L} | {1e3 * t_bigs:.1f} | {1e3 * t_bert:.1f} | {t_bigs / t_bert:.2f} | "
              f"{t_bigs / base[0]:.2f} | {t_bert / base[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
