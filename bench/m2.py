"""CPU forward latency of M2-BERT-base (80M) against BERT-base: ours and HF PyTorch.

    python bench/m2.py [--lengths 512,1024,2048,4096,8192] [--repeats 3] [--smoke]

Batch 1, fp32, eval mode, no head (final hidden states), every model built with max length =
the largest benchmarked length: our `m2-bert-80m` (long convolutions by FFT), our `bert-base`
(full L x L attention) and HF PyTorch `BertModel` (base config; its SDPA attention). Every
figure is the median of `repeats` calls after one warm-up call (which compiles ours).
PyTorch runs in a child process that never starts JAX (see bench/train_step.py for why).

The last columns put our M2 next to the official M2-BERT-80M PyTorch code as measured on this
kind of 2-core VM (issue 4: 0.58 / 1.24 / 2.48 / 5.85 / 13.8 s at 512 / 1024 / 2048 / 4096 /
8192): that code cannot run here (it needs its own repository), so those figures are quoted,
not re-measured, and the ratio is only indicative. The block-diagonal and Monarch matmuls
against dense are in bench/monarch.py. `--smoke` shrinks the models to check the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from train_step import median_seconds  # noqa: E402  (bench/ is on sys.path when run)

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


def jax_times(args) -> dict:
    """Our M2-BERT-80M and BERT-base seconds per forward at each length."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import bigs_jax

    lengths = [int(x) for x in args.lengths.split(",")]
    kw = dict(SMOKE) if args.smoke else {}
    if args.smoke:
        kw["num_heads"] = 2
    out = {"params": {}, "latency": {}, "version": jax.__version__,
           "backend": jax.default_backend()}
    for name in ("m2-bert-80m", "bert-base"):
        extra = {k: v for k, v in kw.items() if name.startswith("bert") or k != "num_heads"}
        model = bigs_jax.create(name, head="none", max_len=max(lengths), **extra)
        out["params"][name] = bigs_jax.count_params(model)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, ids, g=graphdef: nnx.merge(g, s)(ids).hidden_states)
        out["latency"][name] = {}
        for L in lengths:
            ids = jnp.asarray(np.random.default_rng(L).integers(1000, 30000, (1, L)), jnp.int32)
            seconds = median_seconds(lambda s=state: jax.block_until_ready(forward(s, ids)),
                                     args.repeats)
            out["latency"][name][str(L)] = seconds
            print(f"  L={L}: ours {name} {seconds:.3f}s", file=sys.stderr, flush=True)
        del model, state
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models: check the script")
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
    ours = jax_times(args)

    print(f"# bench/m2.py  {datetime.date.today()}  jax {ours['version']}  torch "
          f"{torch_['version']} ({torch_['threads']} threads)  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs  backend "
          f"{ours['backend']}{'  SMOKE (tiny models)' if args.smoke else ''}\n")
    print(f"Forward latency, batch 1, fp32, no head, median of {args.repeats} after one "
          f"warm-up; ours: m2-bert-80m {ours['params']['m2-bert-80m'] / 1e6:.1f}M params, "
          f"bert-base {ours['params']['bert-base'] / 1e6:.1f}M:\n")
    print("| L | M2 ours (s) | BERT ours (s) | BERT HF PyTorch (s) | HF BERT / M2 | "
          "our BERT / M2 | official M2 (quoted, s) | official / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L in args.lengths.split(","):
        m2, bert = ours["latency"]["m2-bert-80m"][L], ours["latency"]["bert-base"][L]
        hf = torch_["latency"][L]
        official = OFFICIAL_M2_SECONDS.get(int(L))
        quoted = (f"{official:.2f} | {official / m2:.2f}" if official and not args.smoke
                  else "- | -")
        print(f"| {L} | {m2:.3f} | {bert:.3f} | {hf:.3f} | {hf / m2:.2f} | {bert / m2:.2f} "
              f"| {quoted} |")


if __name__ == "__main__":
    main()
