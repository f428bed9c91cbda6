"""One BiGS encoder, forward, against today's implementation and this machine's roofline.

    PYTHONPATH=. python bench/bigs_encoder.py [--lengths 512,2048,8192] [--repeats 5,5,3]
                                              [--layers 4] [--modes chunked]

`bigs_jax.create("bigs-large", num_layers=4, max_len=L)` (hidden 1024, intermediate 3072,
N = 64, shared SSMs), batch 1, fp32, all-ones mask, jitted, returning the hidden states (no
MLM head). The baseline is the same model with `ssm_mode="fft"`: the FFT path and the
reverse-within-length backward direction, unchanged from before the chunked mode existed
(the default was "fft"); the new rows use the same params. Per length and mode, timed in
turns with the baseline (baseline, new, baseline, ...) after one warm-up call each:
  - medians of the wall times and the paired ratio (median over rounds of baseline / new,
    each pair back to back), > 1 means the new path is faster;
  - the max |difference| of the hidden states from the baseline's;
  - the roofline: XLA's cost-analysis FLOPs of the new forward divided by the fp32 matmul
    peak (a 4096^3 matmul timed in the same turns), and the fraction of its own roofline
    each forward reaches (median over rounds of roofline / time, both from the same round);
  - the dense layers' share: a function with only the 7 matmuls per layer (same shapes),
    timed in the same turns, as a fraction of the new forward's time.
Then training memory at L = 4096 (`--memory-length`), from XLA's compiled memory analysis of a
gradient (no run): one S4D (B = 8, D = 1024, N = 64) and a 2-layer bigs-small (B = 8), each in
the fft, chunked and scan modes, with the ratio to the fft mode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bigs_jax
from bigs_jax.layers.ssm import S4D, resolve_mode
from bigs_jax.models import make_config
from bigs_jax.models.encoder import Encoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import interleaved_times, paired_ratio  # noqa: E402


def matmul_peak_fn():
    """A 4096^3 fp32 matmul, XLA's best case here: (call, its FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (4096, 4096))
    f = jax.jit(lambda a: a @ a)
    return (lambda: f(a).block_until_ready()), 2 * 4096 ** 3


def encoder_fn(L: int, layers: int, mode: str, state=None):
    """(a call of the jitted forward returning the hidden states, once ready; its state;
    XLA's FLOPs of it)."""
    model = bigs_jax.create("bigs-large", num_layers=layers, max_len=L, ssm_mode=mode)
    graphdef, own = nnx.split(model)
    state = own if state is None else state

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask).hidden_states

    ids, mask = jnp.ones((1, L), jnp.int32), jnp.ones((1, L), jnp.int32)
    flops = forward.lower(state, ids, mask).compile().cost_analysis()["flops"]
    return (lambda: forward(state, ids, mask).block_until_ready()), state, flops


def dense_only_fn(L: int, layers: int):
    """The encoder's matmuls alone (dv, du_f, du_b, duc_f, duc_b, dol, do per layer)."""
    shapes = [(1024, 3072), (1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024),
              (1024, 3072), (3072, 1024)]
    keys = iter(jax.random.split(jax.random.key(1), 7 * layers))
    ws = [[jax.random.normal(next(keys), s) * 0.02 for s in shapes] for _ in range(layers)]

    @jax.jit
    def forward(x_LD, ws):
        for dv, duf, dub, ducf, ducb, dol, do in ws:
            u_LD = (x_LD @ duf) @ ducf + (x_LD @ dub) @ ducb
            x_LD = x_LD + ((u_LD @ dol) + x_LD @ dv) @ do
        return x_LD

    x = jnp.ones((L, 1024))
    return lambda: forward(x, ws).block_until_ready()


def grad_bytes(model, x_shape, call) -> tuple[int, int]:
    """(temporaries, arguments + outputs + temporaries) in bytes of the compiled gradient of
    sum(call(model, x)^2) with respect to the params and the input."""
    graphdef, state = nnx.split(model)

    def loss(state, x):
        return jnp.sum(call(nnx.merge(graphdef, state), x) ** 2)

    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    m = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return m.temp_size_in_bytes, total


def memory_table(L: int, B: int = 8):
    mask = jnp.ones((B, L), jnp.int32)
    cases = {  # name: (model of a mode, input shape, forward)
        "one S4D, B=8, D=1024": (
            lambda mode: S4D(1024, state_size=64, rngs=nnx.Rngs(0)), (B, L, 1024),
            lambda mode: lambda m, x: m(x, mode=mode)),
        "bigs-small 2 layers, B=8": (
            lambda mode: Encoder(make_config("bigs-small", num_layers=2, max_len=L, head="none",
                                             dropout=0.0, ssm_mode=mode), rngs=nnx.Rngs(0)),
            (B, L, 256),
            lambda mode: lambda m, x: m(inputs_embeds=x, attention_mask=mask).hidden_states),
    }
    print(f"\n# training memory, L = {L}: compiled gradient (params and input) of sum(out^2)")
    print("| model | mode | temporaries (MiB) | total (MiB) | total / fft |")
    print("|---|---|---:|---:|---:|")
    for name, (make, shape, call) in cases.items():
        base = None
        for mode in ("fft", "chunked", "scan"):
            temp, total = grad_bytes(make(mode), shape, call(mode))
            base = base or total
            print(f"| {name} | {mode} | {temp / 2**20:.0f} | {total / 2**20:.0f} | "
                  f"{total / base:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--repeats", default="5,5,3", help="per length, or one for all")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", default="chunked", help="new modes to time, e.g. chunked,auto")
    parser.add_argument("--memory-length", type=int, default=4096, help="0 skips the table")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    repeats = [int(x) for x in args.repeats.split(",")]
    repeats = repeats * len(lengths) if len(repeats) == 1 else repeats
    peak, peak_flops = matmul_peak_fn()
    print(f"# bench/bigs_encoder.py  {datetime.date.today()}  jax {jax.__version__}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  "
          f"backend {jax.default_backend()}")
    print(f"# bigs-large, {args.layers} layers, batch 1, fp32, all-ones mask, hidden states; "
          "baseline = ssm_mode='fft' (today's path); times are medians, speedup = paired "
          f"baseline/new; ssm_mode='auto' is {resolve_mode('auto')!r} on this backend")
    print("| L | mode | baseline (s) | new (s) | speedup | max abs diff | GFLOP | peak GFLOP/s | "
          "roofline (s) | roofline / baseline | roofline / new | dense-only / new |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L, reps in zip(lengths, repeats):
        base, state, base_flops = encoder_fn(L, args.layers, "fft")
        dense = dense_only_fn(L, args.layers)
        for mode in args.modes.split(","):
            new, _, flops = encoder_fn(L, args.layers, mode, state)
            t_base, t_new, t_dense, t_peak = interleaved_times([base, new, dense, peak], reps)
            diff = float(np.abs(np.asarray(new()) - np.asarray(base())).max())
            med = statistics.median
            rate = peak_flops / med(t_peak)
            roof = med(flops * tp / peak_flops / tn for tp, tn in zip(t_peak, t_new))
            roof_base = med(base_flops * tp / peak_flops / tb for tp, tb in zip(t_peak, t_base))
            print(f"| {L} | {mode} | {med(t_base):.3f} | {med(t_new):.3f} | "
                  f"{paired_ratio(t_base, t_new):.2f}x | {diff:.1e} | {flops / 1e9:.0f} | "
                  f"{rate / 1e9:.0f} | {flops / rate:.3f} | {roof_base:.0%} | {roof:.0%} | "
                  f"{med(d / n for d, n in zip(t_dense, t_new)):.0%} |", flush=True)
    if args.memory_length:
        memory_table(args.memory_length)


if __name__ == "__main__":
    main()
