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

from bigs_jax.train import layer_stack


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


def _partition(params, keep: list[bool]):
    """(leaves where keep, leaves where not, treedef) of a params pytree."""
    leaves, treedef = jax.tree.flatten(params)
    return ([x for x, k in zip(leaves, keep) if k], [x for x, k in zip(leaves, keep) if not k],
            treedef)


def _combine(kept: list, others: list, keep: list[bool], treedef):
    """The inverse of `_partition`."""
    kept_it, others_it = iter(kept), iter(others)
    return treedef.unflatten([next(kept_it) if k else next(others_it) for k in keep])


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, *,
                    trainable: Any = None, grad_accum_steps: int = 1, grad_norm: bool = True):
    """The train step for `tx` and a loss function from `objectives` (partially applied).

    Args:
      trainable: a pytree of bools shaped like the params (`optim.trainable_mask`), or None
        for all True. Gradients are taken w.r.t. the True leaves only; the others (frozen by
        the optimizer's freeze mask, which keeps no state for them) enter the loss as
        constants and are returned untouched: a frozen backbone costs no gradient and no
        update and stays bitwise equal. The global norm (clipping, stats) then runs over the
        trainable leaves, as in a framework whose frozen tensors hold no gradient.
      grad_norm: report the global gradient norm in the stats. It costs an extra pass over the
        gradients, which then cannot stay fused into the optimizer update (~7% of a GPT-2
        small step's memory traffic on XLA:CPU).
    """
    keep = None if trainable is None else [bool(x) for x in jax.tree.leaves(trainable)]
    if keep is not None and all(keep):
        keep = None

    def sums_and_grads(wrt, to_full, batch, key):
        def f(t):
            s, w, extra = loss_fn(nnx.merge(graphdef, to_full(t)), batch, deterministic=False,
                                  rngs=nnx.Rngs(dropout=key))
            return s, (w, extra)

        (s, (w, extra)), g = jax.value_and_grad(f, has_aux=True)(wrt)
        return s, w, g, extra

    def mean_and_grads(wrt, to_full, batch, key):
        """Without accumulation: differentiate the mean itself (the weights do not depend on
        the params), so no separate pass divides the gradients afterwards."""
        def f(t):
            s, w, extra = loss_fn(nnx.merge(graphdef, to_full(t)), batch, deterministic=False,
                                  rngs=nnx.Rngs(dropout=key))
            return s / jnp.maximum(w, 1.0), extra

        return jax.value_and_grad(f, has_aux=True)(wrt)

    def train_step(state: TrainState, batch):
        rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if keep is None:
            wrt, to_full = state.params, lambda t: t
        else:
            wrt, frozen, treedef = _partition(state.params, keep)
            to_full = lambda t: _combine(t, frozen, keep, treedef)
        if grad_accum_steps == 1:
            (loss, extra), grads = mean_and_grads(wrt, to_full, batch, key)
        else:
            def body(carry, xs):
                s_acc, w_acc, g_acc = carry
                s, w, g, _ = sums_and_grads(wrt, to_full, *xs)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (s_acc + s, w_acc + w, g_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), wrt)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            xs = (_microbatches(batch, grad_accum_steps),
                  jax.random.split(key, grad_accum_steps))
            (s, w, grads), _ = jax.lax.scan(body, init, xs)
            extra = {}
            denom = jnp.maximum(w, 1.0)
            loss = s / denom
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, wrt)
        # The optimizer sees the whole tree; its frozen part (zeros, mapped to set_to_zero and
        # then discarded below) is dead code XLA removes.
        all_grads = grads if keep is None else _combine(
            grads, [jnp.zeros_like(x) for x in frozen], keep, treedef)
        params, opt_state = layer_stack.apply_updates(tx, all_grads, state.opt_state, state.params)
        if keep is not None:
            params = _combine(_partition(params, keep)[0], frozen, keep, treedef)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        stats = {"loss": loss, **extra}
        if grad_norm:  # over the layers stacked if the update is (the same sum, fewer ops)
            stats["grad_norm"] = optax.tree.norm(
                tx.stacks.stack(all_grads) if isinstance(tx, layer_stack.Stacked) else grads)
        return new_state, stats

    return train_step


def make_eval_step(graphdef, loss_fn: Callable):
    """(loss sum, weight sum, the objective's other sums) of one batch, without dropout."""

    def eval_step(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch, deterministic=True, rngs=None)

    return eval_step
