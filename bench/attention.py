"""Attention vs HF PyTorch SDPA, side by side in one run, and forward+backward memory.

    PYTHONPATH=. python bench/attention.py [--layer-lengths 512,1024,2048,4096,8192]
                                           [--model-lengths 512,1024,2048,4096]
                                           [--memory-lengths 1024,2048,4096,8192]
                                           [--repeats 3] [--no-hf]

Three tables, batch 1, fp32, random weights (they do not change the work):

1. Attention layer (BERT-base size: 768 wide, 12 heads): our `SelfAttention` (q/k/v/out
   projections around `dot_product_attention`, whose CPU kernel is the blocked online softmax
   of `layers/flash.py`) vs HF's `BertSdpaSelfAttention` + its output dense, i.e.
   `torch.nn.functional.scaled_dot_product_attention` between the same projections.
2. BERT-base forward: `bigs_jax.create("bert-base")` (jitted, hidden states) vs
   `transformers.BertModel` with `attn_implementation="sdpa"` under `torch.inference_mode`.
3. Forward+backward temporaries of one attention layer of the issue's size (1024 wide, 16
   heads, bf16), from XLA's compiled memory analysis (no run): our kernel vs the dense
   softmax it replaced (one (H, L, L) score matrix and its probabilities kept for the
   backward), with the ratio to the previous length: 2x per doubling is linear, 4x quadratic.

Timings: one warm-up call each (compiles), then `repeats` rounds, ours and theirs interleaved
within a round; medians, and the median of the per-round ratios HF / ours (> 1: ours is
faster). PyTorch runs in a child process that never starts JAX (bench/sdpa_peer.py; in a
process where XLA's CPU runtime is up, PyTorch's thread pool slows down, see
bench/train_step.py); the child runs one call per request, so ours and theirs never overlap. The acceptance figures (issue 18) are the BERT-base ratios at 1K-4K (>= 1.0) and
the memory ratios per doubling at 4K and 8K (~2, linear).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("USE_TF", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bigs_jax  # noqa: E402
from bigs_jax.layers.attention import SelfAttention, make_attention_mask  # noqa: E402

GiB = 1 << 30


def row(L: int, times: dict) -> str:
    ours = statistics.median(times["ours"])
    if "hf" not in times:
        return f"{L:>6}  {ours:>9.3f}  {'-':>9}  {'-':>7}"
    hf = statistics.median(times["hf"])
    ratio = statistics.median(h / o for h, o in zip(times["hf"], times["ours"]))
    return f"{L:>6}  {ours:>9.3f}  {hf:>9.3f}  {ratio:>6.2f}x"


class Peer:
    """The PyTorch child (bench/sdpa_peer.py): `run(kind, L)` times one call there."""

    def __init__(self):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdpa_peer.py")
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())

    def run(self, kind: str, L: int) -> float:
        self.proc.stdin.write(json.dumps({"kind": kind, "L": L}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            sys.exit(f"the PyTorch child process ended (exit {self.proc.wait()})")
        return json.loads(answer)["seconds"]


def layer_runner(L: int):
    D, H = 768, 12
    layer = SelfAttention(D, H, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(L).normal(size=(1, L, D)), jnp.float32)
    mask = make_attention_mask(jnp.ones((1, L), jnp.int32), L)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))
    return lambda: forward(state, x, mask).block_until_ready()


def model_runner(L: int):
    model = bigs_jax.create("bert-base", max_len=max(L, 512))
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(L).integers(1, 30000, (1, L)).astype(np.int32)
    mask = np.ones((1, L), np.int32)
    forward = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).hidden_states)
    return lambda: forward(state, ids, mask).block_until_ready()


def timed(ours, peer: Optional[Peer], kind: str, L: int, repeats: int) -> dict:
    """{name: [seconds per round]}: one warm-up call each (compiles; builds the peer), then
    `repeats` rounds of ours then theirs."""
    fns = {"ours": lambda: _seconds(ours)}
    if peer is not None:
        fns["hf"] = lambda: peer.run(kind, L)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def temp_bytes(L: int, dense: bool) -> int:
    """Compiled forward+backward temporaries of one 1024-wide, 16-head bf16 attention layer."""
    D, H = 1024, 16
    layer = SelfAttention(D, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def dense_attention(q, k, v, mask):  # the einsum this kernel replaced
        logits = jnp.einsum("BLHK,BSHK->BHLS", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask.dense(L, L), logits / 8.0, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("BHLS,BSHV->BLHV", probs, v)

    def loss(state, x, mask):
        layer = nnx.merge(graphdef, state)
        if dense:
            B, H_, K = 1, layer.num_heads, layer.qk_head_dim
            q, k, v = (p(x).reshape(B, L, H_, K) for p in (layer.query, layer.key, layer.value))
            y = layer.out(dense_attention(q, k, v, mask).reshape(B, L, -1))
        else:
            y = layer(x, mask)
        # against x, not a plain sum: a constant cotangent sends XLA constant-folding it
        return jnp.sum((y * x).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((1, L, D), jnp.bfloat16)
    mask = make_attention_mask(jnp.ones((1, L), jnp.int32), L)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(state, x, mask).compile().memory_analysis().temp_size_in_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer-lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--model-lengths", default="512,1024,2048,4096")
    p.add_argument("--memory-lengths", default="1024,2048,4096,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    a = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]
    peer = None if a.no_hf else Peer()
    about = "none" if peer is None else (f"torch {peer.version['torch']}, "
                                         f"{peer.version['threads']} threads, own process")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
          f"{jax.__version__} ({jax.default_backend()}), peer: {about}; batch 1, fp32, "
          f"medians of {a.repeats} interleaved rounds")
    head = f"{'L':>6}  {'ours s':>9}  {'HF s':>9}  {'HF/ours':>7}"
    print("\n## attention layer (768 wide, 12 heads) vs HF BertSdpaSelfAttention + output dense")
    print(head)
    for L in ints(a.layer_lengths):
        print(row(L, timed(layer_runner(L), peer, "layer", L, a.repeats)), flush=True)
    print("\n## BERT-base forward vs HF BertModel (sdpa)")
    print(head)
    for L in ints(a.model_lengths):
        print(row(L, timed(model_runner(L), peer, "model", L, a.repeats)), flush=True)
    print("\n## forward+backward temporaries, one 1024-wide 16-head bf16 layer (compiled, GiB)")
    print(f"{'L':>6}  {'ours':>8}  {'x prev':>6}  {'dense':>8}  {'x prev':>6}")
    prev = None
    for L in ints(a.memory_lengths):
        now = (temp_bytes(L, False) / GiB, temp_bytes(L, True) / GiB)
        grow = ["" if prev is None else f"{n / p_:.2f}x" for n, p_ in zip(now, prev or now)]
        print(f"{L:>6}  {now[0]:>8.3f}  {grow[0]:>6}  {now[1]:>8.3f}  {grow[1]:>6}", flush=True)
        prev = now


if __name__ == "__main__":
    main()
