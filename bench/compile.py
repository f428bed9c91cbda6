"""Compile time of the train step with the layers unrolled (a Python loop) vs scanned.

    python bench/compile.py [--models bigs-large,bert-large] [--what step,grad]
                            [--batch 8] [--seq 128] [--repeats 1] [--check]
                            [--optimizer-steps N]

For each model, the train step that `train.py` jits (`make_train_step`: forward + backward +
the AdamW update of `optim.make_optimizer` with clipping, dropout on, fp32; the masked-LM
objective with 20 predictions per row, or the causal-LM one for decoders), and (`--what grad`)
its forward + backward alone, are traced, lowered and compiled by XLA from abstract inputs
(nothing is allocated), with `scan_layers=False`, with `scan_layers=True`, and (the step only)
with `scan_layers=True` and `train.stacked_update=True` (the optimizer update on the stacked
layers), in turns (unrolled, scanned, stacked, unrolled, ...) so a load that comes and goes on
a shared machine hits them alike. The persistent compilation cache is off; each compile is of a
fresh function. Reported: the median wall seconds of lowering (tracing included) + compiling,
and the process CPU seconds they took (all threads; less sensitive than wall time to other jobs
on a shared machine), and the ratios unrolled / scanned and unrolled / stacked of both (> 1:
compiles faster than unrolled).

`--optimizer-steps N` instead runs the scanned step with the optimizer update per layer and on
the stacked layers, N times each in turns, and prints compile seconds, XLA's temporary bytes
and the step time of both: what the stacked update costs at runtime.

`--check` also runs both models' deterministic forward on one random batch with the same
random parameters and prints the largest absolute difference of the outputs, relative to
their largest magnitude (0 = identical).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bigs_jax  # noqa: E402
from bigs_jax.models import get_spec  # noqa: E402
from bigs_jax.train import objectives, optim  # noqa: E402
from bigs_jax.train.config import optim_config  # noqa: E402
from bigs_jax.train.step import TrainState, make_train_step  # noqa: E402

CAUSAL_FAMILIES = ("gpt2", "bigs_lm")
MAX_PREDICTIONS = 20


def _objective(name: str, config):
    causal = get_spec(name).family in CAUSAL_FAMILIES or getattr(config, "head", "") == "lm"
    if causal:
        return objectives.lm
    return functools.partial(objectives.mlm, max_predictions=MAX_PREDICTIONS)


# How the step runs its layers: a Python loop, one jax.lax.scan, and the scan with the optimizer
# update on the stacked layers too (train.stacked_update, layer_stack.py).
MODES = {"unrolled": (False, False), "scanned": (True, False), "stacked": (True, True)}


def _abstract_step_inputs(name: str, mode: str, batch: int, seq: int):
    """(graphdef, abstract TrainState, abstract batch, loss_fn, tx) of `name`'s train step."""
    scan, stacked = MODES[mode]
    model = nnx.eval_shape(lambda: bigs_jax.create(name, max_len=seq, scan_layers=scan))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # train.py's optimizer (AdamW, warmup + cosine, clipping, no decay on biases and norms)
    tx, _ = optim.make_optimizer(optim_config(), params, 1000, stack_layers=stacked)
    shape = lambda s, d: jax.ShapeDtypeStruct(s, d)
    train_state = TrainState(step=shape((), jnp.int32), params=params,
                             opt_state=jax.eval_shape(tx.init, params),
                             rng=shape((2,), jnp.uint32))
    ids = shape((batch, seq), jnp.int32)
    data = {"input_ids": ids, "attention_mask": ids, "labels": ids,
            "loss_weights": shape((batch, seq), jnp.float32)}
    if _objective(name, model.config) is not objectives.lm:
        data["token_type_ids"] = ids
    return graphdef, train_state, data, _objective(name, model.config), tx


def _grad_only(graphdef, loss_fn):
    """The step's forward + backward alone: (loss, gradients) of (params, batch, key)."""
    def loss(params, batch, key):
        s, w, _ = loss_fn(nnx.merge(graphdef, params), batch, deterministic=False,
                          rngs=nnx.Rngs(dropout=key))
        return s / jnp.maximum(w, 1.0)

    return jax.value_and_grad(loss)


def compile_seconds(name: str, mode: str, batch: int, seq: int,
                    what: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of lowering and compiling `name`'s jitted train
    step (`what` = 'step') or its forward + backward alone ('grad'), its layers run per
    `MODES[mode]`."""
    graphdef, train_state, data, loss_fn, tx = _abstract_step_inputs(name, mode, batch, seq)
    t0, c0 = time.perf_counter(), time.process_time()
    if what == "step":
        step = jax.jit(make_train_step(graphdef, tx, loss_fn), donate_argnums=0)
        lowered = step.lower(train_state, data)
    else:
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        lowered = jax.jit(_grad_only(graphdef, loss_fn)).lower(train_state.params, data, key)
    lowered.compile()
    return time.perf_counter() - t0, time.process_time() - c0


def output_difference(name: str, seq: int) -> float:
    """max |scanned - unrolled| / max |unrolled| of the deterministic forward's logits, both
    models holding the same random parameters."""
    state = nnx.state(bigs_jax.create(name, max_len=seq))
    ids = np.random.default_rng(0).integers(1, 1000, (2, seq))
    mask = np.ones_like(ids)
    mask[1, seq // 2:] = 0
    outs = []
    for scan in (False, True):
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: bigs_jax.create(name, max_len=seq, scan_layers=scan)))
        forward = jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(ids, mask).logits)
        outs.append(np.asarray(forward(state), np.float64))
    return float(np.abs(outs[1] - outs[0]).max() / np.abs(outs[0]).max())


def optimizer_cost(name: str, batch: int, seq: int, steps: int) -> dict:
    """The scanned model's train step with the optimizer update per layer vs on the stacked
    layers (`layer_stack.stacked`): {stack: (compile wall s, XLA temp MiB, [step seconds],
    the last step's loss)}, the steps run on one batch of random tokens in turns (per layer,
    stacked, per layer, ...)."""
    model = bigs_jax.create(name, max_len=seq, scan_layers=True)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    loss_fn = _objective(name, model.config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 1000, (batch, seq)), jnp.int32)
    data = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids,
            "loss_weights": jnp.asarray(rng.random((batch, seq)) < 0.15, jnp.float32)}
    if loss_fn is not objectives.lm:
        data["token_type_ids"] = jnp.zeros_like(ids)
    out, states, steps_of = {}, {}, {}
    for stack in (False, True):
        tx, _ = optim.make_optimizer(optim_config(), params, 1000, stack_layers=stack)
        states[stack] = TrainState(step=jnp.zeros((), jnp.int32),
                                   params=jax.tree.map(jnp.array, params),
                                   opt_state=tx.init(params),
                                   rng=jax.random.key_data(jax.random.key(0)))
        t0 = time.perf_counter()
        steps_of[stack] = jax.jit(make_train_step(graphdef, tx, loss_fn),
                                  donate_argnums=0).lower(states[stack], data).compile()
        seconds = time.perf_counter() - t0
        temp = steps_of[stack].memory_analysis().temp_size_in_bytes / 2**20
        out[stack] = (seconds, temp, [])
    del model, params
    last = {}
    for i in range(steps + 1):  # the first step of each is a warm-up
        for stack in (False, True):
            t0 = time.perf_counter()
            states[stack], last[stack] = steps_of[stack](states[stack], data)
            jax.block_until_ready(last[stack])
            if i:
                out[stack][2].append(time.perf_counter() - t0)
    return {s: (*out[s], float(last[s]["loss"])) for s in out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bigs-large,bert-large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--what", default="step,grad",
                   help="step: the whole train step; grad: its forward + backward alone")
    p.add_argument("--check", action="store_true")
    p.add_argument("--optimizer-steps", type=int, default=0,
                   help="also run the scanned step this many times with the optimizer update "
                        "per layer and on the stacked layers, in turns")
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    if args.optimizer_steps:
        print(f"# scanned train step, optimizer update per layer vs on the stacked layers; "
              f"batch {args.batch} x seq {args.seq}, step seconds: median of "
              f"{args.optimizer_steps} after one warm-up, in turns")
        print(f"{'model':<12}{'update':>10}{'compile s':>11}{'XLA temp MiB':>14}{'step s':>9}"
              f"{'step ratio':>12}{'last loss':>12}")
        for name in args.models.split(","):
            cost = optimizer_cost(name, args.batch, args.seq, args.optimizer_steps)
            base = statistics.median(cost[False][2])
            for stack, label in ((False, "per layer"), (True, "stacked")):
                seconds, temp, steps, loss = cost[stack]
                step = statistics.median(steps)
                print(f"{name:<12}{label:>10}{seconds:>11.1f}{temp:>14.0f}{step:>9.2f}"
                      f"{step / base:>12.3f}{loss:>12.6f}", flush=True)
        return
    print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; batch {args.batch} x "
          f"seq {args.seq}, median of {args.repeats}; wall s (process CPU s)")
    print(f"{'model':<12}{'program':>8}{'layers':>7}{'unrolled':>17}{'scanned':>17}"
          f"{'scan+stacked':>17}{'wall ratios':>14}{'CPU ratios':>13}"
          + ("  max rel diff" if args.check else ""))
    for name, what in itertools.product(args.models.split(","), args.what.split(",")):
        # the stacked update changes nothing in forward + backward alone
        modes = list(MODES) if what == "step" else ["unrolled", "scanned"]
        times = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                times[mode].append(compile_seconds(name, mode, args.batch, args.seq, what))
        med = {m: [statistics.median(t[i] for t in times[m]) for i in (0, 1)] for m in times}
        depth = nnx.eval_shape(lambda: bigs_jax.create(name, max_len=args.seq)).config.num_layers
        cell = lambda m: f"{med[m][0]:.1f} ({med[m][1]:.1f})" if m in med else "-"
        ratios = lambda i: " / ".join(f"{med['unrolled'][i] / med[m][i]:.2f}" for m in modes[1:])
        line = (f"{name:<12}{what:>8}{depth:>7}{cell('unrolled'):>17}{cell('scanned'):>17}"
                f"{cell('stacked'):>17}{ratios(0):>14}{ratios(1):>13}")
        if args.check:
            line += f"  {output_difference(name, args.seq):.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
