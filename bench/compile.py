"""Compile time of the train step with the layers unrolled (a Python loop) vs scanned.

    python bench/compile.py [--models bigs-large,bert-large] [--what step,grad] [--batch 8]
                            [--seq 128] [--repeats 1] [--check]

For each model, the train step that `train.py` jits (`make_train_step`: forward + backward +
AdamW update, dropout on, fp32; the masked-LM objective with 20 predictions per row, or the
causal-LM one for decoders), and (`--what grad`) its forward + backward alone, are traced,
lowered and compiled by XLA from abstract inputs
(nothing is allocated), once with `scan_layers=False` and once with `scan_layers=True`, in
turns (unrolled, scanned, unrolled, ...) so a load that comes and goes on a shared machine hits
both alike. The persistent compilation cache is off; each compile is of a fresh function.
Reported: the median wall seconds of lowering (tracing included) + compiling, and the process
CPU seconds they took (all threads; less sensitive than wall time to other jobs on a shared
machine), and the ratios unrolled / scanned of both (> 1: scanning compiles faster).

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
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import bigs_jax  # noqa: E402
from bigs_jax.models import get_spec  # noqa: E402
from bigs_jax.train import objectives  # noqa: E402
from bigs_jax.train.step import TrainState, make_train_step  # noqa: E402

CAUSAL_FAMILIES = ("gpt2", "bigs_lm")
MAX_PREDICTIONS = 20


def _objective(name: str, config):
    causal = get_spec(name).family in CAUSAL_FAMILIES or getattr(config, "head", "") == "lm"
    if causal:
        return objectives.lm
    return functools.partial(objectives.mlm, max_predictions=MAX_PREDICTIONS)


def _abstract_step_inputs(name: str, scan: bool, batch: int, seq: int):
    """(graphdef, abstract TrainState, abstract batch, loss_fn, tx) of `name`'s train step."""
    model = nnx.eval_shape(lambda: bigs_jax.create(name, max_len=seq, scan_layers=scan))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optax.adamw(1e-4, weight_decay=0.01)
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


def compile_seconds(name: str, scan: bool, batch: int, seq: int,
                    what: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of lowering and compiling `name`'s jitted train
    step (`what` = 'step') or its forward + backward alone ('grad')."""
    graphdef, train_state, data, loss_fn, tx = _abstract_step_inputs(name, scan, batch, seq)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bigs-large,bert-large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--what", default="step,grad",
                   help="step: the whole train step; grad: its forward + backward alone")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; batch {args.batch} x "
          f"seq {args.seq}, median of {args.repeats}; wall s (process CPU s)")
    print(f"{'model':<12}{'program':>8}{'layers':>7}{'unrolled':>17}{'scanned':>17}"
          f"{'wall ratio':>11}{'CPU ratio':>10}" + ("  max rel diff" if args.check else ""))
    for name, what in itertools.product(args.models.split(","), args.what.split(",")):
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for scan in (False, True):
                times[scan].append(compile_seconds(name, scan, args.batch, args.seq, what))
        med = {s: [statistics.median(t[i] for t in times[s]) for i in (0, 1)] for s in times}
        depth = nnx.eval_shape(lambda: bigs_jax.create(name, max_len=args.seq)).config.num_layers
        cell = lambda s: f"{med[s][0]:.1f} ({med[s][1]:.1f})"
        line = (f"{name:<12}{what:>8}{depth:>7}{cell(False):>17}{cell(True):>17}"
                f"{med[False][0] / med[True][0]:>11.2f}{med[False][1] / med[True][1]:>10.2f}")
        if args.check:
            line += f"  {output_difference(name, args.seq):.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
