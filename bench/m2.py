"""CPU forward latency of M2-BERT-80M: today's layers against the pre-issue-18 ones and this
machine's roofline; with --bert, also against BERT-base (ours and HF PyTorch).

    python bench/m2.py [--lengths 512,1024,2048,4096,8192] [--repeats 3] [--bert] [--smoke]
                       [--conv-mode auto] [--conv-precision fp32]

Batch 1, fp32, eval mode, no head (final hidden states), every model built with max length =
the largest benchmarked length. Default table: our `m2-bert-80m` (long convolutions by FFT on
CPU) with its layer stack channel-major (`channel_major=True`, the default) and the same
weights run (B, L, D) (`channel_major=False`: the layout before issue 18; the filter kernel is
computed the same way in both, so that part of the issue-18 work is in both columns). The two
are timed in turns (old, new, old, ...) after one warm-up call each; figures are medians and
"old / new" is the median of the per-round ratios.

Roofline: the forward's FLOPs as XLA's cost analysis of the compiled programs counts them
(`compiled.cost_analysis()["flops"]`; the programs have no loops, so nothing is undercounted),
the smaller of the two layouts' counts (they do the same arithmetic, but the channel-major
program's count is ~6% higher at 8192: the analysis charges some slices of fused elementwise
producers at the producer's full size, work the generated code does not do), divided by this
machine's fp32 matmul peak, measured in the same run as the best GFLOP/s of a
few large square `jnp.dot`s (before and after the M2 timings, the best of all). "roofline" is
that ideal time over the measured median: the fraction of the peak the whole forward reaches.

The official M2-BERT-80M PyTorch code cannot run here (it needs its own repository); its
figures on this kind of 2-core VM are quoted from issue 4 (0.58 / 1.24 / 2.48 / 5.85 / 13.8 s
at 512 / 1024 / 2048 / 4096 / 8192), so "official / new" is only indicative. `--bert` adds
our `bert-base` (full L x L attention) and HF PyTorch `BertModel` (base config, SDPA) at every
length, the table this script printed before issue 18; PyTorch runs in a child process that
never starts JAX (see bench/train_step.py for why). The block-diagonal and Monarch matmuls
against dense are in bench/monarch.py. `--smoke` shrinks the models to check the script.
`--conv-mode` / `--conv-precision` set both M2 models' long convolutions (`M2Config`; default
auto = fft on CPU, the Monarch DFT GEMMs on TPU/GPU, in fp32); the header names them.
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

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from train_step import interleaved_times, median_seconds, paired_ratio  # noqa: E402

# Official M2-BERT-80M PyTorch code, batch 1 forward on a 2-core VM (quoted from issue 4).
OFFICIAL_M2_SECONDS = {512: 0.58, 1024: 1.24, 2048: 2.48, 4096: 5.85, 8192: 13.8}
SMOKE = {"hidden_size": 64, "num_layers": 2, "intermediate_size": 256}


def torch_times(args) -> dict:
    """HF PyTorch BertModel seconds per forward at each length (run in a JAX-free process)."""
    import torch
    import transformers as tr

    lengths = [int(x) for x in args.lengths.split(",")]
    kw = ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 256} if args.smoke else {})
    model = tr.BertModel(tr.BertConfig(max_position_embeddings=max(lengths), **kw),
                         add_pooling_layer=False).eval()
    out = {"threads": torch.get_num_threads(), "version": torch.__version__, "latency": {}}
    for L in lengths:
        ids = torch.tensor(np.random.default_rng(L).integers(1000, 30000, (1, L)),
                           dtype=torch.long)

        def run():
            with torch.no_grad():
                model(input_ids=ids)

        out["latency"][str(L)] = median_seconds(run, args.repeats)
        print(f"  L={L}: HF PyTorch BERT {out['latency'][str(L)]:.3f}s", file=sys.stderr,
              flush=True)
    return out


def matmul_peak(sizes=(1024, 2048, 3072, 4096)) -> float:
    """The best fp32 GFLOP/s of a few large square `jnp.dot`s (median of 3 calls each)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(n).standard_normal((n, n)), jnp.float32)
        dot = jax.jit(jnp.dot)
        seconds = median_seconds(lambda a=a: jax.block_until_ready(dot(a, a)), 3)
        best = max(best, 2 * n ** 3 / seconds / 1e9)
    return best


def m2_times(args) -> dict:
    """M2-BERT-80M channel-major (new) and (B, L, D) (old): seconds, paired ratios, XLA FLOPs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import bigs_jax

    lengths = [int(x) for x in args.lengths.split(",")]
    kw = dict(SMOKE, head="none", max_len=max(lengths), seed=0) if args.smoke else dict(
        head="none", max_len=max(lengths), seed=0)
    forwards = {}
    for name, channel_major in (("old", False), ("new", True)):
        model = bigs_jax.create("m2-bert-80m", channel_major=channel_major,
                                conv_mode=args.conv_mode, conv_precision=args.conv_precision,
                                **kw)
        graphdef, state = nnx.split(model)
        forwards[name] = (jax.jit(lambda s, ids, g=graphdef: nnx.merge(g, s)(ids).hidden_states),
                          state)
    sizes = (256, 512) if args.smoke else (1024, 2048, 3072, 4096)
    out = {"params": bigs_jax.count_params(model), "version": jax.__version__,
           "backend": jax.default_backend(), "peaks": [matmul_peak(sizes)], "rows": {}}
    for L in lengths:
        ids = jnp.asarray(np.random.default_rng(L).integers(1000, 30000, (1, L)), jnp.int32)
        # timed through the very executables whose FLOPs are counted (one compile each)
        compiled = {name: (fwd.lower(state, ids).compile(), state)
                    for name, (fwd, state) in forwards.items()}
        flops = {name: exe.cost_analysis()["flops"] for name, (exe, _) in compiled.items()}
        steps = [lambda f=exe, s=state: jax.block_until_ready(f(s, ids))
                 for exe, state in compiled.values()]
        old, new = interleaved_times(steps, args.repeats)
        out["rows"][L] = {"old": statistics.median(old), "new": statistics.median(new),
                          "ratio": paired_ratio(old, new), "flops": flops}
        print(f"  L={L}: old {out['rows'][L]['old']:.3f}s  new {out['rows'][L]['new']:.3f}s",
              file=sys.stderr, flush=True)
    out["peaks"].append(matmul_peak(sizes))
    return out


def bert_times(args) -> dict:
    """Our BERT-base seconds per forward at each length."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import bigs_jax

    lengths = [int(x) for x in args.lengths.split(",")]
    kw = dict(SMOKE, num_heads=2) if args.smoke else {}
    model = bigs_jax.create("bert-base", head="none", max_len=max(lengths), **kw)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).hidden_states)
    out = {"params": bigs_jax.count_params(model), "latency": {}}
    for L in lengths:
        ids = jnp.asarray(np.random.default_rng(L).integers(1000, 30000, (1, L)), jnp.int32)
        out["latency"][L] = median_seconds(lambda: jax.block_until_ready(forward(state, ids)),
                                           args.repeats)
        print(f"  L={L}: ours bert-base {out['latency'][L]:.3f}s", file=sys.stderr, flush=True)
    return out


def print_m2(args, m2: dict) -> None:
    peak = max(m2["peaks"])
    print(f"Forward latency, batch 1, fp32, no head, median of {args.repeats} in turns after "
          f"one warm-up; m2-bert-80m {m2['params'] / 1e6:.1f}M params, long convolutions "
          f"conv_mode={args.conv_mode}, conv_precision={args.conv_precision}. fp32 matmul peak "
          f"{peak:.1f} GFLOP/s (best square jnp.dot; {m2['peaks'][0]:.1f} before, "
          f"{m2['peaks'][1]:.1f} after the M2 timings). FLOPs: XLA cost analysis.\n")
    print("| L | GFLOP (new / old) | old (s) | new (s) | old / new | roofline (s) | "
          "roofline new | roofline old | official M2 (quoted, s) | official / new |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L, row in m2["rows"].items():
        gflop = row["flops"]["new"] / 1e9
        ideal = min(row["flops"].values()) / 1e9 / peak
        official = OFFICIAL_M2_SECONDS.get(L)
        quoted = (f"{official:.2f} | {official / row['new']:.2f}" if official and not args.smoke
                  else "- | -")
        print(f"| {L} | {gflop:.1f} / {row['flops']['old'] / 1e9:.1f} | {row['old']:.3f} | "
              f"{row['new']:.3f} | {row['ratio']:.2f} | {ideal:.3f} | "
              f"{ideal / row['new']:.0%} | {ideal / row['old']:.0%} "
              f"| {quoted} |")


def print_bert(args, m2: dict, bert: dict, torch_: dict) -> None:
    print(f"\nWith --bert: our bert-base ({bert['params'] / 1e6:.1f}M params) and HF PyTorch "
          f"BertModel (torch {torch_['version']}, {torch_['threads']} threads), median of "
          f"{args.repeats} after one warm-up, against our M2 (new):\n")
    print("| L | M2 ours (s) | BERT ours (s) | BERT HF PyTorch (s) | HF BERT / M2 | "
          "our BERT / M2 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for L, row in m2["rows"].items():
        hf, ours = torch_["latency"][str(L)], bert["latency"][L]
        print(f"| {L} | {row['new']:.3f} | {ours:.3f} | {hf:.3f} | {hf / row['new']:.2f} | "
              f"{ours / row['new']:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bert", action="store_true",
                        help="also time our BERT-base and HF PyTorch BertModel")
    parser.add_argument("--smoke", action="store_true", help="tiny models: check the script")
    parser.add_argument("--conv-mode", default="auto",
                        help="M2Config.conv_mode: auto | fft | monarch | toeplitz")
    parser.add_argument("--conv-precision", default="fp32",
                        help="M2Config.conv_precision: fp32 | bf16_3x | bf16")
    parser.add_argument("--only-torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_torch:
        print(json.dumps(torch_times(args)))
        return
    torch_ = None
    if args.bert:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                                "--only-torch"], capture_output=True, text=True, check=False)
        if child.returncode:
            sys.exit(f"the PyTorch child process failed:\n{child.stderr[-3000:]}")
        torch_ = json.loads(child.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    m2 = m2_times(args)
    bert = bert_times(args) if args.bert else None
    print(f"# bench/m2.py  {datetime.date.today()}  jax {m2['version']}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  backend "
          f"{m2['backend']}{'  SMOKE (tiny models)' if args.smoke else ''}  "
          f"({time.perf_counter() - t0:.0f}s)\n")
    print_m2(args, m2)
    if bert is not None:
        print_bert(args, m2, bert, torch_)


if __name__ == "__main__":
    main()
