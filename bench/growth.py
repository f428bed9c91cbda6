"""Grown vs from-scratch pretraining: training FLOPs to reach the large model's final loss.

    python bench/growth.py [--models bigs,bert] [--seeds 0,1] [--steps 600] [--grow-at 200]
                           [--policies nu_median,zero,nu_median+rewarm50] [--batch-size 32]
                           [--seq-len 128]
                           [--workdir /tmp/bench_growth]

Masked-LM pretraining on the embedded corpus (configs/quickstart.py's data and optimizer).
For each model and seed: the large model (hidden 128, 4 layers, MLP 512) trained from scratch
for `steps` steps, and the small one (hidden 64, 2 layers, MLP 256; ~1/4 of the non-embedding
parameters) trained for `grow_at` steps, then grown to the large size by `config.growth` and
trained to `steps`, once per optimizer-state policy (a policy "+rewarmN" also re-warms the
lr over N updates after growth). Training FLOPs are 6 · parameters ·
tokens per step, summed over steps (the small phase at the small size). Reported: the first
evaluation step at which the grown run's eval loss is at or below the from-scratch run's
final eval loss, the FLOPs spent by then, and their ratio to the from-scratch run's FLOPs
(< 1: growth saved compute); "never" when the grown run does not get there within `steps`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bigs_jax.data import registry  # noqa: E402
from bigs_jax.train import checkpointing, loop  # noqa: E402
from bigs_jax.train import workdir as workdir_lib  # noqa: E402
from configs import quickstart  # noqa: E402

SMALL = dict(hidden_size=64, num_layers=2, intermediate_size=256)
LARGE = dict(hidden_size=128, num_layers=4, intermediate_size=512)
MODELS = {"bigs": "bigs-small", "bert": "bert-small"}


BATCH = {"batch_size": 32, "seq_len": 128}  # --batch-size, --seq-len


def config_for(model: str, dims: dict, steps: int, seed: int, growth: list | None = None):
    c = quickstart.get_config()
    c.data.batch_size, c.data.seq_len = BATCH["batch_size"], BATCH["seq_len"]
    c.train.max_predictions = max(8, BATCH["seq_len"] // 4)
    c.model.name = MODELS[model]
    for k, v in dims.items():
        c.model[k] = v
    c.model.num_heads = 4
    c.model.ssm_state = 16
    c.train.steps = steps
    c.train.seed = seed
    c.train.eval_every = max(steps // 12, 1)
    c.train.checkpoint_every = steps
    c.train.log_every = steps
    c.optim.warmup_steps = min(50, steps // 10)
    c.optim.schedule = "constant"  # the same lr before and after growth
    c.data.eval_batches = 4
    if growth:
        c.growth = json.dumps(growth)
    return c


def flops_curve(summary: dict, params_at) -> dict:
    """{eval step: training FLOPs up to it}, with params_at(step) the model size at a step."""
    tokens_per_step = summary["tokens"] / summary["steps"]
    out, total, prev = {}, 0.0, 0
    for step in sorted(summary["eval_loss"]):
        total += sum(6 * params_at(s) * tokens_per_step for s in range(prev, step))
        out[step], prev = total, step
    return out


def run(args) -> list[dict]:
    rows = []
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            base = os.path.join(args.workdir, f"{model}-{seed}")
            scratch = loop.train_and_evaluate(
                config_for(model, LARGE, args.steps, seed), f"{base}-scratch")
            large_params = _params(f"{base}-scratch")
            target = scratch["eval_loss"][args.steps]
            scratch_flops = flops_curve(scratch, lambda s: large_params)[args.steps]
            for policy in args.policies.split(","):
                event = {"step": args.grow_at, **_policy_options(policy), **LARGE}
                grown = loop.train_and_evaluate(
                    config_for(model, SMALL, args.steps, seed, [event]),
                    f"{base}-grown-{policy}")
                small_params = _params_small(model, seed, args)
                curve = flops_curve(grown, lambda s: small_params if s < args.grow_at
                                    else large_params)
                hit = next((s for s in sorted(grown["eval_loss"])
                            if grown["eval_loss"][s] <= target), None)
                rows.append({"model": model, "seed": seed, "policy": policy,
                             "target": target, "grown_final": grown["eval_loss"][args.steps],
                             "jump": grown["growth"][args.grow_at],
                             "step": hit, "flops_ratio": None if hit is None
                             else curve[hit] / scratch_flops})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _policy_options(policy: str) -> dict:
    """Schedule-entry options of a --policies item: "nu_median" or "nu_median+rewarm50" (the
    optimizer-state policy, then an lr re-warm over 50 updates)."""
    name, _, rewarm = policy.partition("+rewarm")
    return {"policy": name, **({"rewarm_steps": int(rewarm)} if rewarm else {})}


def _count(config) -> int:
    """All parameters (embeddings included) of a model config, without initializing it."""
    import bigs_jax
    from flax import nnx

    return bigs_jax.count_params(nnx.eval_shape(lambda: bigs_jax.build(config)))


def _params(workdir: str) -> int:
    return _count(checkpointing.read_model_config(workdir))


def _params_small(model: str, seed: int, args) -> int:
    c = config_for(model, SMALL, args.steps, seed)
    return _count(workdir_lib.model_config_from(c, registry.make_data_source(c).model_overrides()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bigs,bert")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--grow-at", type=int, default=200)
    p.add_argument("--policies", default="nu_median,zero")
    p.add_argument("--workdir", default="/tmp/bench_growth")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    BATCH.update(batch_size=args.batch_size, seq_len=args.seq_len)
    rows = run(args)
    print("\nmodel policy  seeds  FLOPs ratio to reach the from-scratch final eval loss")
    for model in args.models.split(","):
        for policy in args.policies.split(","):
            r = [x["flops_ratio"] for x in rows if x["model"] == model and x["policy"] == policy]
            got = [x for x in r if x is not None]
            spread = (f"median {statistics.median(got):.2f} (min {min(got):.2f}, max "
                      f"{max(got):.2f})" if got else "")
            print(f"{model:5s} {policy:18s} {len(r)}  reached in {len(got)}/{len(r)} {spread}")


if __name__ == "__main__":
    main()
