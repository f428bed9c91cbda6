"""Decoding throughput: cached `bigs_jax.generate` vs prefix recomputation vs HF PyTorch.

    python bench/generate.py [--model gpt2] [--batches 1,8] [--prompt 128] [--new 128]
                             [--repeats 3] [--recompute-repeats N] [--no-recompute] [--no-hf]

Greedy continuation of random prompts by a randomly initialized model of the registry (the
weights do not change the work), measured side by side in one run, medians of `repeats` timed
runs after one warm-up (which compiles; for the recompute baseline a one-token call, which
compiles its one forward; `--recompute-repeats` sets its own repeats, as it is the slow one).
Ours cached and HF's run in turns (ours, HF, ours, HF, ...) so a load that comes and goes on a
shared machine hits both alike; their `time / cached` is the median of the pairs' ratios (the
recompute baseline, timed after them, is its median over ours):

1. ours, cached: `bigs_jax.generate` (one compiled prefill + one compiled decode loop with the
   key/value cache); every row generates exactly `new` tokens (no eos).
2. ours, recompute: `evals.scrolls.greedy_decode`, the prefix-recompute decoder SCROLLS used
   before the cache (one compiled forward over the whole (B, prompt + new) block per token).
3. HF, PyTorch: `GPT2LMHeadModel.generate(do_sample=False, min_new_tokens=new)` with its
   DynamicCache, same config, fp32 (GPT-2 models only; `--no-hf` skips it).

tokens/s counts new tokens (B · new) over the whole call, prefill included.

    python bench/generate.py --per-token 128,512,2048,8192 [--ssm-model bigs-lm-mini]
                             [--model gpt2-mini] [--steps 32] [--repeats 5]

`--per-token` prints instead the time of one cached decode step (batch 1) as the context
grows: GPT-2's step attends over a key/value cache of context + steps positions, so it grows
with the context; the causal gated-SSM LM (`bigs-lm-*`) carries one (D, N) state per layer, so
its step does not. Each figure is a compiled loop of `steps` greedy decode steps (the
`decode_step` that `bigs_jax.generate` runs) from a cache of that context, median of
`repeats`, divided by `steps`. The caches hold zeros: a step's work does not depend on their
values, and an 8k-token attention prefill would dominate the run. Both models get
max_len = context + steps so positions exist.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("USE_TF", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py)
from train_step import interleaved_times, paired_ratio  # noqa: E402

import bigs_jax  # noqa: E402
from bigs_jax.evals.scrolls import greedy_decode  # noqa: E402



def hf_runner(model, prompts: np.ndarray, new: int):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_len, n_embd=c.hidden_size,
        n_layer=c.num_layers, n_head=c.num_heads)).eval()
    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + new

    return run


def rows_for(model, B: int, P: int, new: int, repeats: int, hf: bool,
             recompute_repeats: int) -> dict[str, tuple[float, int, float]]:
    """{decoder: (median s, timed runs, paired time / cached)}: ours cached and HF's in turns
    (a, b, a, b, ...; each ratio the median of the pairs'), the recompute baseline after."""
    prompts = np.random.default_rng(B).integers(1, model.config.vocab_size, (B, P))
    prompts = prompts.astype(np.int32)

    def cached():
        out = bigs_jax.generate(model, prompts, max_new_tokens=new, return_dict=True)
        assert out.new_tokens.shape == (B, new)

    def recompute(n=new):
        greedy_decode(model, prompts.tolist(), max_new_tokens=n, eos_id=-1, seq_len=P + new,
                      batch_size=B)

    runs = [cached] + ([hf_runner(model, prompts, new)] if hf else [])
    times = interleaved_times(runs, repeats)
    ours = statistics.median(times[0])
    out = {"ours, cached (KV cache)": (ours, repeats, 1.0)}
    if hf:
        out["HF transformers, PyTorch"] = (statistics.median(times[1]), repeats,
                                           paired_ratio(times[1], times[0]))
    if recompute_repeats:
        # Every recompute step runs the one compiled (B, P + new) forward: one token warms it.
        t = median_time(recompute, recompute_repeats, warmup=lambda: recompute(1))
        out["ours, prefix recompute"] = (t, recompute_repeats, t / ours)
    return out


def step_time(name: str, context: int, steps: int, repeats: int) -> tuple[float, int]:
    """(seconds per cached decode step at `context`, cache bytes per row) of registry model
    `name`, batch 1 (module docstring)."""
    over = dict(max_len=context + steps)
    if name.startswith("gpt2"):
        over.update(dropout=0.0, attention_dropout=0.0)
    model = bigs_jax.create(name, **over)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, context + steps)

    @jax.jit
    def loop(state, cache):
        m = nnx.merge(graphdef, state)
        consts = m.decode_constants(context + steps)

        def body(g, carry):
            tok, cache = carry
            logits, cache = m.decode_step(tok, jnp.full((1,), context + g, jnp.int32), cache,
                                          consts)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (jnp.ones((1,), jnp.int32), cache))

    t = median_time(lambda: jax.block_until_ready(loop(state, cache)), repeats)
    return t / steps, sum(x.nbytes for x in jax.tree.leaves(cache))


def per_token_table(a) -> None:
    contexts = [int(c) for c in a.per_token.split(",")]
    print(f"# bench/generate.py --per-token {datetime.date.today()} "
          f"{platform.processor() or platform.machine()} jax {jax.__version__} backend "
          f"{jax.default_backend()}; batch 1, fp32, {a.steps} greedy steps per timing, "
          f"medians of {a.repeats}\n")
    print(f"| context | {a.model} ms/token | {a.ssm_model} ms/token | {a.model} / "
          f"{a.ssm_model} | {a.model} cache MiB | {a.ssm_model} cache MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for context in contexts:
        (tg, mg), (ts, ms) = (step_time(n, context, a.steps, a.repeats)
                              for n in (a.model, a.ssm_model))
        print(f"| {context} | {tg * 1e3:.2f} | {ts * 1e3:.2f} | {tg / ts:.2f} | "
              f"{mg / 2**20:.2f} | {ms / 2**20:.3f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--recompute-repeats", type=int, default=0,
                   help="timed runs of the (slow) recompute baseline; 0: --repeats")
    p.add_argument("--no-recompute", action="store_true",
                   help="leave the recompute baseline out (minutes per row on a CPU)")
    p.add_argument("--per-token", default="", help="contexts, e.g. 128,512,2048,8192")
    p.add_argument("--ssm-model", default="bigs-lm-mini")
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()
    if a.per_token:
        return per_token_table(a)
    model = bigs_jax.create(a.model, dropout=0.0, attention_dropout=0.0) \
        if a.model.startswith("gpt2") else bigs_jax.create(a.model)
    hf = not a.no_hf and a.model.startswith("gpt2")
    print(f"# bench/generate.py {datetime.date.today()} {platform.processor() or platform.machine()}"
          f" jax {jax.__version__} backend {jax.default_backend()} ({jax.devices()[0]})")
    print(f"# model {a.model} ({bigs_jax.count_params(model):,} params), prompt {a.prompt}, "
          f"new {a.new}, greedy, medians of {a.repeats}\n")
    print("| decoder | batch | prompt | new | repeats | median s | new tokens/s | time / cached |")
    print("|---|---|---|---|---|---|---|---|")
    for B in (int(b) for b in a.batches.split(",")):
        times = rows_for(model, B, a.prompt, a.new, a.repeats, hf,
                         0 if a.no_recompute else a.recompute_repeats or a.repeats)
        for name, (t, n, ratio) in times.items():
            print(f"| {name} | {B} | {a.prompt} | {a.new} | {n} | {t:.3f} | "
                  f"{B * a.new / t:,.0f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
