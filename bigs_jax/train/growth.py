"""Growing a running job: params and Adam state of a TrainState, and the growth schedule.

`grow_state` applies `bigs_jax.growth.grow_params` to the params and carries the optimizer
state over: every old entry of every moment (μ, ν) keeps its value bit for bit, wherever the
growth moved it (`growth.index_maps`). New entries get μ = 0 and ν by `policy`:

  * "nu_median" (default): ν = the median ν of the old entries of the same parameter (of the
    same parameter in the old layers, for a new layer). New updates start near 0 and ramp up
    as μ fills and ν adapts to the new entries' own (small) gradients: a built-in warmup.
  * "nu_mean": the same with the mean, which heavy tails make much larger: new entries stay
    almost frozen (≤ 0.1x the old entries' updates for 100 steps).
  * "zero": ν = 0 with the old count (what MSG does). optax's Adam has one count per group, so
    the bias correction is ≈ 1 while ν holds a few squared gradients: new updates inflate.
  * "own_count": ν = 0, and the updates of new entries rescaled as if their bias correction
    used their own count (`own_count`): fresh Adam for the new entries, ~sign(g)·lr steps.

Measured (GPT-2 tiny, 300 steps, then intermediate 256→512, hidden 64→128, layers 2→3; median
|update| of new vs old entries of layer-0/1 mlp/up and layer-0 query kernels, steps 2-100
after growth; `python bench/growth_policies.py`):

    policy     β2=0.98: max ratio, steps 2-10   β2=0.999: max ratio      loss spike
    zero       4.3                               26.7                     2.04 → 3.44 (β2=.999)
    own_count  3.4                               9.6                      none
    nu_mean    0.01                              0.01                     none
    nu_median  0.14 (0.4-0.7 by step 100)        0.17 (0.1-0.5 by 100)    none

(Measured with a first version of the script that drew pre- and post-growth batches from one
stream; the committed script at β2 = 0.999 gives zero 27.5x with a spike 2.04 → 3.10 at step
10, nu_median ≤ 0.15x in steps 1-10 and 0.15-0.77x at step 100.)

The schedule (`config.growth`, a list of {"step": s, <size>: n, ...}) is read by
`growth_events`; the loop calls `grow_state` when it reaches each step. An entry's
`"rewarm_steps": n` re-warms the learning rate of every parameter after that growth (linear
from lr/n to lr over n updates, `optim.rewarmed`): the fourth option, ablated in
bench/growth.py.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigs_jax import fs, growth
from bigs_jax.train import checkpointing, optim
from bigs_jax.train.step import TrainState

POLICIES = ("own_count", "nu_mean", "nu_median", "zero")
# Keys of a schedule entry that are not sizes.
_EVENT_OPTIONS = ("step", "hidden_mode", "layer_positions", "policy", "seed", "rewarm_steps")
# Policies a train run can use: own_count changes the optimizer state's structure, which a
# resumed run (built from the config) could not restore.
LOOP_POLICIES = ("nu_median", "nu_mean", "zero")


def _key_name(k) -> Optional[str]:
    return getattr(k, "key", None) if isinstance(k, jax.tree_util.DictKey) else None


def _split_path(path) -> tuple[str, Optional[str]]:
    """(state prefix, param path) of an optimizer-state leaf; param path None for leaves that
    are not per-parameter (counts)."""
    j = len(path)
    while j > 0 and isinstance(path[j - 1], jax.tree_util.DictKey):
        j -= 1
    prefix = jax.tree_util.keystr(tuple(path[:j]))
    if j == len(path) or not prefix.endswith((".mu", ".nu")):
        return prefix + jax.tree_util.keystr(tuple(path[j:])), None
    return prefix, "/".join(str(_key_name(k)) for k in path[j:])


def _generic(path: str) -> str:
    return re.sub(r"^layers/\d+/", "layers/*/", path)


def grow_opt_state(old_state, new_init, old_params: dict, maps: dict, order: list[str], *,
                   policy: str = "nu_median"):
    """The grown optimizer state: `new_init` (tx.init of the grown params) with every old
    moment entry copied to where `maps` puts it and new entries filled per `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer-state growth policy {policy!r}; choose one of "
                         f"{POLICIES}")
    sizes = {p: int(np.prod(np.shape(old_params[p]))) for p in order}
    old_leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(old_state)[0]:
        old_leaves[_split_path(path)] = np.asarray(jax.device_get(leaf))
    cats = {}

    def concat(prefix):
        if prefix not in cats:
            parts = [old_leaves.get((prefix, p), np.full(sizes[p], np.nan, np.float32)).ravel()
                     for p in order]
            cats[prefix] = np.concatenate(parts)
        return cats[prefix]

    def fill_value(prefix, param, idx, cat):
        if prefix.endswith(".mu") or policy in ("zero", "own_count"):
            return 0.0
        sel = idx > 0
        if sel.any():
            vals = cat[idx[sel] - 1]
            return float(np.median(vals) if policy == "nu_median" else np.mean(vals))
        same = [v for (pre, p), v in old_leaves.items()
                if pre == prefix and p is not None and _generic(p) == _generic(param)]
        pool = same or [v for (pre, p), v in old_leaves.items() if pre == prefix and p]
        return float(np.mean(np.concatenate([v.ravel() for v in pool])))

    def grow_leaf(path, leaf):
        prefix, param = _split_path(path)
        if param is None:
            return old_leaves[(prefix, None)] if (prefix, None) in old_leaves else leaf
        idx, cat = maps[param], concat(prefix)
        out = np.full(idx.shape, fill_value(prefix, param, idx, cat), np.asarray(leaf).dtype)
        sel = idx > 0
        out[sel] = cat[idx[sel] - 1]
        return out

    return jax.tree_util.tree_map_with_path(grow_leaf, new_init)


class OwnCountState(NamedTuple):
    """State of `own_count`: steps since growth, the Adam count at growth, new-entry masks."""
    steps: jax.Array
    count0: jax.Array
    new: Any  # pytree like the params: int8, 1 where the entry is new


def own_count(tx: optax.GradientTransformation, *, b1: float, b2: float,
              new_masks: Optional[Any] = None) -> optax.GradientTransformation:
    """`tx` (an Adam-family chain with one step count) whose updates of new entries are
    rescaled as if their bias correction used their own count, t = steps since growth:

        f(t) = [√(1 - β2^t) / (1 - β1^t)] / [√(1 - β2^(T+t)) / (1 - β1^(T+t))],

    T the count at growth; f → 1 as t grows. Exact for Adam's m̂/√v̂ up to ε. `new_masks`
    (int8 pytree) is stored in the state; None makes all-zero masks (restoring a checkpoint
    fills them).
    """

    def init(params):
        masks = new_masks if new_masks is not None else jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.int8), params)
        return (tx.init(params), OwnCountState(jnp.zeros((), jnp.int32),
                                               jnp.zeros((), jnp.int32), masks))

    def update(updates, state, params=None):
        inner, own = state
        updates, inner = tx.update(updates, inner, params)
        t = (own.steps + 1).astype(jnp.float32)
        big_t = own.count0.astype(jnp.float32) + t
        f = (jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)) / (
            jnp.sqrt(1 - b2 ** big_t) / (1 - b1 ** big_t))
        updates = jax.tree.map(
            lambda u, m: u * jnp.where(m > 0, f, 1.0).astype(u.dtype), updates, own.new)
        return updates, (inner, own._replace(steps=own.steps + 1))

    return optax.GradientTransformation(init, update)


def adam_count(opt_state) -> int:
    """The largest Adam step count in an optimizer state."""
    counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if jax.tree_util.keystr(p).endswith(".count")]
    return max(counts, default=0)


def grow_state(state: TrainState, model_config,
               make_tx: Callable[[Any], optax.GradientTransformation], *, seed: int = 0,
               policy: str = "nu_median", betas: tuple[float, float] = (0.9, 0.999),
               **grow_kwargs) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """`state` grown per `grow_kwargs` (sizes, hidden_mode, layer_positions).

    Returns (grown state, grown model config, the optimizer of the grown params: `make_tx`'s,
    wrapped in `own_count` for that policy, `betas` being its Adam β1, β2). The step and rng
    carry over unchanged; moments as the module docstring says.
    """
    params = jax.device_get(state.params)
    opt = jax.device_get(state.opt_state)
    if isinstance(opt, tuple) and len(opt) == 2 and isinstance(opt[1], OwnCountState):
        opt = opt[0]  # an earlier growth's wrapper: its young entries become ordinary ones
    new_config, new_params = growth.grow_params(model_config, params, seed=seed, **grow_kwargs)
    _, maps, order = growth.index_maps(model_config, params, seed=seed, **grow_kwargs)
    base = make_tx(new_params)
    inner = grow_opt_state(opt, base.init(new_params), growth._flat_np(params), maps, order,
                           policy=policy)
    inner = jax.tree.map(jnp.asarray, inner)
    if policy != "own_count":
        return state.replace(params=new_params, opt_state=inner), new_config, base
    keys = growth._keys(new_params)
    masks = growth._unflat({p: jnp.asarray((m == 0).astype(np.int8)) for p, m in maps.items()},
                           keys)
    tx = own_count(base, b1=betas[0], b2=betas[1], new_masks=masks)
    own = OwnCountState(jnp.zeros((), jnp.int32), jnp.asarray(adam_count(opt), jnp.int32), masks)
    return state.replace(params=new_params, opt_state=(inner, own)), new_config, tx


def growth_events(config) -> list[dict]:
    """The growth schedule of a run config (`config.growth`, a list or a JSON string), sorted
    by step, each entry checked."""
    raw = config.growth
    if not raw:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"config.growth is not valid JSON ({e}); write e.g. "
                             '\'[{"step": 100, "hidden_size": 256}]\'') from None
    events = []
    for e in raw:
        e = dict(e)
        if "step" not in e or int(e["step"]) <= 0:
            raise ValueError(f"config.growth entry {e} needs a positive 'step'")
        unknown = sorted(set(e) - set(_EVENT_OPTIONS) - set(growth.SIZE_FIELDS))
        if unknown:
            raise ValueError(f"config.growth entry {e} has unknown keys {unknown}; sizes are "
                             f"{list(growth.SIZE_FIELDS)}, options {list(_EVENT_OPTIONS)}")
        if int(e.get("rewarm_steps", 0)) < 0:
            raise ValueError(f"config.growth entry {e}: rewarm_steps must be >= 0 (0: no lr "
                             "re-warm)")
        if e.get("policy", "nu_median") not in LOOP_POLICIES:
            raise ValueError(f"config.growth entry {e}: policy must be one of {LOOP_POLICIES} "
                             "in a train run")
        events.append(e)
    steps = [int(e["step"]) for e in events]
    if len(set(steps)) != len(steps):
        raise ValueError(f"config.growth has two entries at one step ({sorted(steps)}); "
                         "merge them into one entry")
    return sorted(events, key=lambda e: int(e["step"]))


def restarts(config) -> list[tuple[int, int]]:
    """The (step, n) lr re-warms of a run's growth schedule (entries with `rewarm_steps` n > 0),
    for `optim.make_optimizer`."""
    return [(int(e["step"]), int(e["rewarm_steps"])) for e in growth_events(config)
            if int(e.get("rewarm_steps", 0)) > 0]


def event_kwargs(event: dict) -> dict:
    """grow_params keywords of a schedule entry."""
    kw = {k: v for k, v in event.items() if k in growth.SIZE_FIELDS}
    for k in ("hidden_mode", "layer_positions"):
        if event.get(k) is not None:
            kw[k] = event[k]
    return kw


# ---------------------------------------------------------------------------- the train loop
# A run with a schedule trains in segments: the loop stops at each growth step s (evaluating,
# not saving the small state), `grow_checkpoint` grows the state and saves it as checkpoint s
# (then writes the grown model.json), and the loop resumes from s as from any checkpoint,
# with the model config `config_at(base, events, s)`: re-sharded, re-compiled. A run killed
# at any point resumes to the same losses as an uninterrupted one.


def config_at(base_config, events: list[dict], step: int):
    """The model config after every growth event at or before `step`."""
    config = base_config
    for e in events:
        if int(e["step"]) <= step:
            config = growth.grow_config(config, **event_kwargs(e))
    return config


def next_stop(events: list[dict], step: int, total: int) -> int:
    """The first growth step after `step`, or `total`."""
    return min([int(e["step"]) for e in events if step < int(e["step"]) < total] + [total])


def sync_model_json(workdir: str, base_config, events: list[dict], model_config) -> None:
    """Rewrite model.json for `model_config` when it holds another stage of this schedule
    (a run killed between a growth checkpoint and its model.json); other models are left for
    the loop's own check to refuse."""
    path = fs.join(workdir, checkpointing.MODEL_JSON)
    if not fs.exists(path):
        return
    existing = checkpointing.read_model_config(workdir)
    stages = [config_at(base_config, events, s)
              for s in [0] + [int(e["step"]) for e in events]]
    if existing != model_config and existing in stages and fs.is_primary():
        checkpointing.write_json_atomic(path, checkpointing.model_json(model_config))


def grow_checkpoint(config, workdir: str, state: TrainState, base_config, events, step: int,
                    ckpt, writer, data_state: Optional[bytes] = None) -> None:
    """At growth step `step`: grow `state`, save it as checkpoint `step` (with the input
    position `data_state`), write model.json and log the growth to TensorBoard."""
    event = next(e for e in events if int(e["step"]) == step)
    model_config = config_at(base_config, events, step - 1)
    t = config.train
    make_tx = lambda p: optim.make_optimizer(config.optim, p, t.steps, restarts(config))[0]
    grown, new_config, _ = grow_state(
        state, model_config, make_tx, seed=int(event.get("seed", t.seed + step)),
        policy=event.get("policy", "nu_median"), betas=(config.optim.b1, config.optim.b2),
        **event_kwargs(event))
    ckpt.save(step, grown.params, grown.opt_state,
              {"rng": np.asarray(grown.rng).tolist(), "step": step,
               "data": {"task": config.data.task, "batches_consumed": step}}, force=True,
              data_state=data_state)
    ckpt.wait()
    if fs.is_primary():
        checkpointing.write_json_atomic(fs.join(workdir, checkpointing.MODEL_JSON),
                                        checkpointing.model_json(new_config))
    n_old, n_new = (checkpointing.param_count(x) for x in (state.params, grown.params))
    scalars = {"growth/params": n_new, "growth/params_ratio": n_new / n_old}
    scalars.update({f"growth/{k}": float(v) for k, v in event_kwargs(event).items()
                    if k in growth.SIZE_FIELDS})
    writer.write_scalars(step, scalars)
    print(f"step {step}: grew {n_old:,} -> {n_new:,} params ({event_kwargs(event)})",
          flush=True)
