"""Optax chains from the config: AdamW, warmup + decay schedules, clipping, per-group options.

Per-group learning rates, weight-decay exclusions and freezing are masks built from regexes
over parameter paths ("layers/3/fs4/A_re"), never `stop_gradient` in model code.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from bigs_jax.paths import path_str
from bigs_jax.train import layer_stack

SCHEDULES = ("cosine", "linear", "constant")
log = logging.getLogger(__name__)


def schedule(c: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * end_lr_ratio`."""
    warmup = min(int(c.warmup_steps), total_steps)
    decay = max(total_steps - warmup, 1)
    end = c.lr * c.end_lr_ratio
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, decay, alpha=c.end_lr_ratio)
    elif c.schedule == "linear":
        after = optax.linear_schedule(c.lr, end, decay)
    elif c.schedule == "constant":
        after = optax.constant_schedule(c.lr)
    else:
        raise ValueError(f"unknown optim.schedule {c.schedule!r}; choose one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), after], [warmup])


def rewarmed(base: optax.Schedule, restarts: Sequence[tuple[int, int]]) -> optax.Schedule:
    """`base` times a linear ramp over the `n` updates from each (`step`, `n`) of `restarts`.

    The ramp is the lr re-warm after a growth step: the update with optax count `step` (the
    first update of the model grown at train step `step`) gets 1/n of the lr, the n-th one all
    of it. Counts before `step` are unchanged.
    """
    if not restarts:
        return base

    def lr(count):
        scale = 1.0
        for step, n in restarts:
            ramp = jnp.clip((count - step + 1) / n, 0.0, 1.0)
            scale = scale * jnp.where(count >= step, ramp, 1.0)
        return base(count) * scale

    return lr


def path_labels(params, fn: Callable[[str], Any]):
    """A pytree like `params` holding fn(path) at every leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), params)


def _matches(patterns: Sequence[str], path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def trainable_mask(c: ConfigDict, params):
    """A pytree like `params`: False where a `freeze` regex matches the path, else True."""
    freeze = list(c.freeze)
    return path_labels(params, lambda s: not _matches(freeze, s))


def make_optimizer(c: ConfigDict, params, total_steps: int,
                   restarts: Sequence[tuple[int, int]] = (), *, stack_layers: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `params` and its base learning-rate schedule.

    `restarts`: (step, n) lr re-warms (`rewarmed`), from a growth schedule's `rewarm_steps`.
    `stack_layers`: compute the update on the layer stacks' parameters stacked
    (`layer_stack.stacked`; same state and updates, far fewer ops to compile) where every
    layer of a stack has the same group and decay labels; otherwise per layer, with a log line.

    Config keys (under `optim`): lr, warmup_steps, schedule, end_lr_ratio, b1, b2, eps,
    weight_decay, clip_norm, no_decay (regexes), groups (list of {pattern, lr_scale,
    weight_decay}), freeze (regexes).
    """
    base = rewarmed(schedule(c, total_steps), restarts)
    groups = list(c.groups)
    freeze = list(c.freeze)
    no_decay = list(c.no_decay)

    def label(path: str) -> str:
        if _matches(freeze, path):
            return "frozen"
        for i, g in enumerate(groups):
            if re.search(g["pattern"], path):
                return f"group{i}"
        return "default"

    labels = path_labels(params, label)
    decay = path_labels(params, lambda s: not _matches(no_decay, s))
    stacks = layer_stack.LayerStacks.find(params) if stack_layers else None
    if stacks is not None:
        try:
            labels, decay = stacks.stack(labels), stacks.stack(decay)
        except layer_stack.NotUniform:
            log.info("optimizer: the layers' groups or decay masks differ, so the update "
                     "runs per layer (slower to compile) instead of on the stacked layers")
            stacks = None
    decay_of = {path_str(p): d for p, d in jax.tree_util.tree_flatten_with_path(decay)[0]}
    # optax hands each group's mask function that group's tree (other groups' leaves masked)
    mask = lambda p: jax.tree_util.tree_map_with_path(lambda q, _: decay_of[path_str(q)], p)

    def adamw(lr_scale: float, weight_decay: float) -> optax.GradientTransformation:
        lr = base if lr_scale == 1.0 else (lambda step: base(step) * lr_scale)
        return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=weight_decay,
                           mask=mask)

    transforms = {"default": adamw(1.0, c.weight_decay), "frozen": optax.set_to_zero()}
    for i, g in enumerate(groups):
        transforms[f"group{i}"] = adamw(g.get("lr_scale", 1.0),
                                        g.get("weight_decay", c.weight_decay))
    used = set(jax.tree.leaves(labels))
    tx = optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
    if c.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
    if stacks is not None:
        tx = layer_stack.stacked(tx, stacks)
    return tx, base
