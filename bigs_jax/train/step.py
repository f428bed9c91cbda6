"""The jitted train and eval steps: pure functions of (state, batch).

Gradient accumulation scans over microbatches with an fp32 accumulator of summed losses and
gradients, then divides by the total loss weight, so k microbatches give the same update as one
step on the k-times batch (up to float reassociation).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `params` is a pure dict shaped like the model's state."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints need no typed-key support


def _microbatches(batch: dict, k: int) -> dict:
    """(B, ...) → (k, B/k, ...) with microbatch i = rows i, i+k, ...: each device keeps its rows."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                             f"train.grad_accum_steps={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, *,
                    grad_accum_steps: int = 1, grad_norm: bool = True):
    """The train step for `tx` and a loss function from `objectives` (partially applied).

    Args:
      grad_norm: report the global gradient norm in the stats. It costs an extra pass over the
        gradients, which then cannot stay fused into the optimizer update (~7% of a GPT-2
        small step's memory traffic on XLA:CPU).
    """

    def sums_and_grads(params, batch, key):
        def f(p):
            s, w, extra = loss_fn(nnx.merge(graphdef, p), batch, deterministic=False,
                                  rngs=nnx.Rngs(dropout=key))
            return s, (w, extra)

        (s, (w, extra)), g = jax.value_and_grad(f, has_aux=True)(params)
        return s, w, g, extra

    def mean_and_grads(params, batch, key):
        """Without accumulation: differentiate the mean itself (the weights do not depend on
        the params), so no separate pass divides the gradients afterwards."""
        def f(p):
            s, w, extra = loss_fn(nnx.merge(graphdef, p), batch, deterministic=False,
                                  rngs=nnx.Rngs(dropout=key))
            return s / jnp.maximum(w, 1.0), extra

        return jax.value_and_grad(f, has_aux=True)(params)

    def train_step(state: TrainState, batch):
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if grad_accum_steps == 1:
            (loss, extra), grads = mean_and_grads(state.params, batch, key)
        else:
            def body(carry, xs):
                s_acc, w_acc, g_acc = carry
                s, w, g, _ = sums_and_grads(state.params, *xs)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (s_acc + s, w_acc + w, g_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            xs = (_microbatches(batch, grad_accum_steps),
                  jax.random.split(key, grad_accum_steps))
            (s, w, grads), _ = jax.lax.scan(body, init, xs)
            extra = {}
            denom = jnp.maximum(w, 1.0)
            loss = s / denom
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        stats = {"loss": loss, **extra}
        if grad_norm:
            stats["grad_norm"] = optax.tree.norm(grads)
        return new_state, stats

    return train_step


def make_eval_step(graphdef, loss_fn: Callable):
    """(loss sum, weight sum, the objective's other sums) of one batch, without dropout."""

    def eval_step(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch, deterministic=True, rngs=None)

    return eval_step
