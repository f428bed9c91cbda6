"""Training-step throughput and forward latency of our BERT / GPT-2 against HF Flax and PyTorch.

    python bench/train_step.py [--batch 8] [--seq 128] [--repeats 5]
                               [--lengths 128,512,1024,2048,4096] [--smoke]

Part 1, one training step (forward + backward + AdamW update, lr 1e-4, weight decay 0.01,
dropout on as in training), fp32, same batch for every framework, each computing the loss and
the update and nothing else (ours: `make_train_step(..., grad_norm=False)`):
  - BERT-base masked LM (vocab 30522, 15% of positions selected): ours computes the MLM head
    only at the selected positions (the trainer's `max_predictions` path, 20 per row); HF
    `FlaxBertForMaskedLM` and PyTorch `BertForMaskedLM` compute it at every position, as
    their training scripts do.
  - GPT-2 small (124M, vocab 50257) causal LM against HF `FlaxGPT2LMHeadModel` and PyTorch
    `GPT2LMHeadModel`.
Attention-probability dropout differs between the peers: PyTorch (and our default) draws a
mask per element; HF's Flax models use Flax's `broadcast_dropout`, one (L, L) mask shared by
all examples and heads, B*H times fewer random bits. Ours is therefore timed twice: with its
default (the PyTorch peer's computation) and with `attention_dropout_broadcast=True` (the Flax
peer's computation); each ratio compares the same computation, and "ours/Flax (default)" is
shown too.
Part 2, BERT-base forward latency (no head, batch 1, eval mode) against PyTorch `BertModel`
at each length (both built with max positions = the largest length).

Every figure is the median of `repeats` timed calls after one warm-up call (which compiles the
JAX functions); ours and HF Flax are timed in turns (ours, Flax, ours, ...), so a load that
comes and goes on a shared machine affects both alike. Ratios are ours / peer for tokens/s
and peer / ours for latency, so > 1 means ours is faster. PyTorch is timed in a child
process that never starts JAX: once XLA's CPU runtime is up in a process, PyTorch's OpenMP
pool there slows down by up to ~20x on small models. `--smoke` shrinks the models to check the script itself in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow too
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

LR, WEIGHT_DECAY, MASK_RATE, MAX_PREDICTIONS = 1e-4, 0.01, 0.15, 20


def median_seconds(step, repeats: int) -> float:
    """Median wall time of `step()` (which must block until its work is done)."""
    return interleaved_medians([step], repeats)[0]


def interleaved_medians(steps, repeats: int) -> list[float]:
    """Median wall time of each of `steps`, timed in turns (a, b, a, b, ...) after one warm-up
    call each, so a load that comes and goes on a shared machine hits them alike."""
    return [statistics.median(t) for t in interleaved_times(steps, repeats)]


def interleaved_times(steps, repeats: int) -> list[list[float]]:
    """Every timed call of `interleaved_medians`: one list of `repeats` seconds per step."""
    for step in steps:
        step()  # compile / warm-up
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, out in zip(steps, times):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    return times


def paired_ratio(peer: list[float], ours: list[float]) -> float:
    """Median over rounds of peer time / our time, each pair timed back to back: steadier than
    a ratio of medians when the machine's speed drifts during the run."""
    return statistics.median(p / o for p, o in zip(peer, ours))


# ---------------------------------------------------------------------------- batches


def mlm_batch(B: int, L: int, vocab: int, seed: int = 0) -> dict:
    """Random ids with round(15% * L) selected positions per row (labels = original ids)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (B, L), dtype=np.int32)
    n = min(round(MASK_RATE * L), MAX_PREDICTIONS)
    weights = np.zeros((B, L), np.float32)
    for b in range(B):
        weights[b, rng.choice(np.arange(1, L - 1), n, replace=False)] = 1.0
    masked = np.where(weights > 0, 103, ids).astype(np.int32)
    return {"input_ids": masked, "labels": ids, "loss_weights": weights,
            "attention_mask": np.ones((B, L), np.int32)}


def lm_batch(B: int, L: int, vocab: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, vocab, (B, L + 1), dtype=np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "loss_weights": np.ones((B, L), np.float32),
            "attention_mask": np.ones((B, L), np.int32)}


# ---------------------------------------------------------------------------- ours


def ours_step(model, batch: dict, objective: str):
    """A blocking closure running our trainer's jitted train step (state donated)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bigs_jax.train.objectives import OBJECTIVES
    from bigs_jax.train.step import TrainState, make_train_step

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    loss_fn = functools.partial(OBJECTIVES[objective],
                                max_predictions=MAX_PREDICTIONS if objective == "mlm" else 0)
    train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params),
                                  rng=jax.random.key_data(jax.random.key(0)))
    # The peers compute the loss and the update only; so does ours here (the trainer's
    # default also reports the gradient norm: `train.log_grad_norm`, one more gradient pass).
    step = jax.jit(make_train_step(graphdef, tx, loss_fn, grad_norm=False), donate_argnums=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    holder = [train_state]

    def run():
        holder[0], stats = step(holder[0], batch)
        jax.block_until_ready(stats["loss"])

    return run


# ---------------------------------------------------------------------------- HF Flax


def flax_step(model, batch: dict, objective: str):
    """HF Flax model + optax AdamW, one jitted step, params donated."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    ids, labels = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["labels"])
    mask, weights = jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["loss_weights"])

    def loss_fn(params, rng):
        logits = model(ids, attention_mask=mask, params=params, dropout_rng=rng,
                       train=True).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (ce * weights).sum() / weights.sum()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rng):
        rng, sub = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(params, sub)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rng, loss

    holder = [model.params, tx.init(model.params), jax.random.key(0)]

    def run():
        params, opt_state, rng, loss = step(*holder)
        holder[:] = [params, opt_state, rng]
        jax.block_until_ready(loss)

    return run


# ---------------------------------------------------------------------------- PyTorch


def torch_step(model, batch: dict, objective: str):
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    if objective == "mlm":
        labels = torch.tensor(np.where(batch["loss_weights"] > 0, batch["labels"], -100),
                              dtype=torch.long)
    else:
        labels = ids  # GPT2LMHeadModel shifts internally

    def run():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()

    return run


# ---------------------------------------------------------------------------- main

CASES = (("BERT-base MLM", "mlm"), ("GPT-2 small LM", "lm"))


def hf_configs(args):
    """(BertConfig, GPT2Config, BertConfig for latency) of the benchmarked sizes."""
    import transformers as tr

    bert = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128) if args.smoke else {}
    gpt2 = dict(n_embd=64, n_layer=2, n_head=2) if args.smoke else {}
    lengths = [int(x) for x in args.lengths.split(",")]
    return (tr.BertConfig(**bert), tr.GPT2Config(**gpt2),
            tr.BertConfig(max_position_embeddings=max(lengths), **bert), lengths)


def batch_for(objective: str, args, bert_cfg, gpt2_cfg) -> dict:
    if objective == "mlm":
        return mlm_batch(args.batch, args.seq, bert_cfg.vocab_size)
    return lm_batch(args.batch, args.seq, gpt2_cfg.vocab_size)


def torch_times(args) -> dict:
    """PyTorch seconds per train step and per forward (run in a JAX-free process)."""
    import torch
    import transformers as tr

    bert_cfg, gpt2_cfg, long_cfg, lengths = hf_configs(args)
    out = {"threads": torch.get_num_threads(), "train": {}, "latency": {}}
    for (name, objective), make in zip(CASES, (lambda: tr.BertForMaskedLM(bert_cfg),
                                               lambda: tr.GPT2LMHeadModel(gpt2_cfg))):
        batch = batch_for(objective, args, bert_cfg, gpt2_cfg)
        out["train"][name] = median_seconds(torch_step(make(), batch, objective), args.repeats)
    if not args.skip_latency:
        peer = tr.BertModel(long_cfg, add_pooling_layer=False).eval()
        for L in lengths:
            ids = torch.tensor(np.random.default_rng(L).integers(1000, long_cfg.vocab_size,
                                                                 (1, L)), dtype=torch.long)

            def run():
                with torch.no_grad():
                    peer(input_ids=ids)

            out["latency"][str(L)] = median_seconds(run, args.repeats)
    return out


def jax_times(args) -> dict:
    """Our and HF Flax seconds per train step, our seconds per forward, our param counts."""
    import jax
    import jax.numpy as jnp
    import transformers as tr
    from flax import nnx

    import bigs_jax

    bert_cfg, gpt2_cfg, long_cfg, lengths = hf_configs(args)
    ours = {
        "mlm": lambda **kw: bigs_jax.create(
            "bert-base", max_len=bert_cfg.max_position_embeddings,
            hidden_size=bert_cfg.hidden_size, num_layers=bert_cfg.num_hidden_layers,
            num_heads=bert_cfg.num_attention_heads, intermediate_size=bert_cfg.intermediate_size,
            **kw),
        "lm": lambda **kw: bigs_jax.create("gpt2", hidden_size=gpt2_cfg.n_embd,
                                           num_layers=gpt2_cfg.n_layer, num_heads=gpt2_cfg.n_head,
                                           **kw),
    }
    flax_models = {"mlm": lambda: tr.FlaxBertForMaskedLM(bert_cfg, seed=0),
                   "lm": lambda: tr.FlaxGPT2LMHeadModel(gpt2_cfg, seed=0)}
    out = {"train": {}, "train_broadcast": {}, "flax": {}, "paired": {}, "params": {},
           "latency": {}}
    for name, objective in CASES:
        batch = batch_for(objective, args, bert_cfg, gpt2_cfg)
        model = ours[objective]()
        out["params"][name] = bigs_jax.count_params(model)
        broadcast = ours[objective](attention_dropout_broadcast=True)
        times = interleaved_times([ours_step(model, batch, objective),
                                   ours_step(broadcast, batch, objective),
                                   flax_step(flax_models[objective](), batch, objective)],
                                  args.repeats)
        out["train"][name], out["train_broadcast"][name], out["flax"][name] = (
            statistics.median(t) for t in times)
        out["paired"][name] = (paired_ratio(times[2], times[1]), paired_ratio(times[2], times[0]))
        del model, broadcast
        print(f"  {name}: ours {out['train'][name]:.3f}s  ours with Flax's attention dropout "
              f"{out['train_broadcast'][name]:.3f}s  HF Flax {out['flax'][name]:.3f}s",
              file=sys.stderr, flush=True)
    if not args.skip_latency:
        model = bigs_jax.create(
            "bert-base", head="none", max_len=max(lengths), hidden_size=long_cfg.hidden_size,
            num_layers=long_cfg.num_hidden_layers, num_heads=long_cfg.num_attention_heads,
            intermediate_size=long_cfg.intermediate_size)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).hidden_states)
        for L in lengths:
            ids = jnp.asarray(np.random.default_rng(L).integers(1000, long_cfg.vocab_size, (1, L)),
                              jnp.int32)
            out["latency"][str(L)] = median_seconds(
                lambda: jax.block_until_ready(forward(state, ids)), args.repeats)
            print(f"  L={L}: ours {out['latency'][str(L)] * 1e3:.1f} ms", file=sys.stderr,
                  flush=True)
    out["versions"] = f"jax {jax.__version__}  transformers {tr.__version__}"
    out["backend"] = jax.default_backend()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="128,512,1024,2048,4096")
    parser.add_argument("--smoke", action="store_true", help="tiny models: check the script")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--only-torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_torch:
        print(json.dumps(torch_times(args)))
        return
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                            "--only-torch"], capture_output=True, text=True, check=False)
    if child.returncode:
        sys.exit(f"the PyTorch child process failed:\n{child.stderr[-3000:]}")
    torch_ = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"  PyTorch: {torch_['train']}", file=sys.stderr, flush=True)
    ours = jax_times(args)

    import torch

    print(f"# bench/train_step.py  {datetime.date.today()}  {ours['versions']}  torch "
          f"{torch.__version__} ({torch_['threads']} threads)  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  backend "
          f"{ours['backend']}{'  SMOKE (tiny models)' if args.smoke else ''}\n")
    tokens = args.batch * args.seq
    print(f"Training step (fwd+bwd+AdamW, fp32, dropout on), tokens/s, batch "
          f"{args.batch}x{args.seq}, median of {args.repeats} after one warm-up:\n")
    print("Attention dropout: \"per element\" is ours by default and PyTorch's; \"shared\" is "
          "one (L, L) mask for all examples and heads, as HF Flax does.\n")
    print("| model | params (ours) | ours, per element | ours, shared | HF Flax (shared) "
          "| HF PyTorch (per element) | ours/Flax, shared | ours/PyTorch, per element "
          "| ours per element / Flax |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in CASES:
        o, b, f, t = (tokens / d[name] for d in (ours["train"], ours["train_broadcast"],
                                                   ours["flax"], torch_["train"]))
        shared, own = ours["paired"][name]
        print(f"| {name} | {ours['params'][name] / 1e6:.1f}M | {o:,.0f} | {b:,.0f} | {f:,.0f} "
              f"| {t:,.0f} | {b / f:.2f} ({shared:.2f}) | {o / t:.2f} | {o / f:.2f} ({own:.2f}) |")
    print("\nRatios against HF Flax: of the medians, and in parentheses the median over rounds "
          "of the back-to-back ratio.")
    if ours["latency"]:
        print(f"\nBERT-base forward latency (no head), batch 1, fp32, median of {args.repeats} "
              "after one warm-up:\n")
        print("| L | ours (ms) | HF PyTorch BertModel (ms) | PyTorch/ours |")
        print("|---:|---:|---:|---:|")
        for L, o in ours["latency"].items():
            t = torch_["latency"][L]
            print(f"| {L} | {o * 1e3:,.1f} | {t * 1e3:,.1f} | {t / o:.2f} |")


if __name__ == "__main__":
    main()
