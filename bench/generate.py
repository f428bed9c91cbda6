"""Decoding throughput: cached `bigs_jax.generate` vs prefix recomputation vs HF PyTorch.

    python bench/generate.py [--model gpt2] [--batches 1,8] [--prompt 128] [--new 128]
                             [--repeats 3] [--no-hf]

Greedy continuation of random prompts by a randomly initialized model of the registry (the
weights do not change the work), measured side by side in one run, medians of `repeats` timed
runs after one warm-up (which compiles):

1. ours, cached: `bigs_jax.generate` (one compiled prefill + one compiled decode loop with the
   key/value cache); every row generates exactly `new` tokens (no eos).
2. ours, recompute: `evals.scrolls.greedy_decode`, the prefix-recompute decoder SCROLLS used
   before the cache (one compiled forward over the whole (B, prompt + new) block per token).
3. HF, PyTorch: `GPT2LMHeadModel.generate(do_sample=False, min_new_tokens=new)` with its
   DynamicCache, same config, fp32 (GPT-2 models only; `--no-hf` skips it).

tokens/s counts new tokens (B · new) over the whole call, prefill included.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("USE_TF", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py)

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


def rows_for(model, B: int, P: int, new: int, repeats: int, hf: bool):
    prompts = np.random.default_rng(B).integers(1, model.config.vocab_size, (B, P))
    prompts = prompts.astype(np.int32)

    def cached():
        out = bigs_jax.generate(model, prompts, max_new_tokens=new, return_dict=True)
        assert out.new_tokens.shape == (B, new)

    def recompute():
        greedy_decode(model, prompts.tolist(), max_new_tokens=new, eos_id=-1, seq_len=P + new,
                      batch_size=B)

    runs = {"ours, cached (KV cache)": cached, "ours, prefix recompute": recompute}
    if hf:
        runs["HF transformers, PyTorch"] = hf_runner(model, prompts, new)
    return {name: median_time(fn, repeats) for name, fn in runs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    a = p.parse_args()
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
        times = rows_for(model, B, a.prompt, a.new, a.repeats, hf)
        ours = times["ours, cached (KV cache)"]
        for name, t in times.items():
            print(f"| {name} | {B} | {a.prompt} | {a.new} | {a.repeats} | {t:.3f} | "
                  f"{B * a.new / t:,.0f} | {t / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
