"""The optimizer update on stacked layers (`layer_stack.stacked`) against the per-layer one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import bigs_jax
from bigs_jax.paths import path_str
from bigs_jax.train import layer_stack, objectives, optim
from bigs_jax.train.config import NO_DECAY, SSM_PARAMS
from bigs_jax.train.step import TrainState, make_train_step

MLM = functools.partial(objectives.mlm, max_predictions=6)
_rng = np.random.default_rng(1)
BATCH = {"input_ids": _rng.integers(5, 500, (4, 32)).astype(np.int32),
         "attention_mask": np.ones((4, 32), np.int32),
         "token_type_ids": np.zeros((4, 32), np.int32),
         "labels": _rng.integers(5, 500, (4, 32)).astype(np.int32),
         "loss_weights": (_rng.random((4, 32)) < 0.15).astype(np.float32)}


def cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, schedule="cosine", end_lr_ratio=0.1, b1=0.9,
                b2=0.98, eps=1e-6, weight_decay=0.1, clip_norm=0.0, no_decay=list(NO_DECAY),
                groups=[], freeze=[])
    return ConfigDict({**base, **kw})


def layer(rng):
    return {"fs4": {"A_re": rng.normal(size=4), "C": rng.normal(size=(4, 2))},
            "dv": {"kernel": rng.normal(size=(3, 3)), "bias": rng.normal(size=3)},
            "norm": {"scale": rng.normal(size=3), "bias": rng.normal(size=3)}}


def params(depth=3, seed=0):
    rng = np.random.default_rng(seed)
    tree = {"embed": {"kernel": rng.normal(size=(5, 3))},
            "layers": {i: layer(rng) for i in range(depth)},
            "head": {"bias": rng.normal(size=5)}}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def run(c, p, stack: bool, steps=4):
    """(params, opt state) after `steps` jitted updates with random gradients."""
    tx, _ = optim.make_optimizer(c, p, 100, stack_layers=stack)

    @jax.jit
    def step(p, state, key):
        grads = jax.tree.map(lambda x, k: jax.random.normal(k, x.shape),
                             p, jax.tree.unflatten(jax.tree.structure(p),
                                                   jax.random.split(key, len(jax.tree.leaves(p)))))
        updates, state = tx.update(grads, state, p)
        return jax.tree.map(jnp.add, p, updates), state

    state = tx.init(p)
    for i in range(steps):
        p, state = step(p, state, jax.random.key(i))
    return p, state


CONFIGS = {
    "adamw": cfg(),
    "groups, freeze, clip": cfg(groups=[{"pattern": SSM_PARAMS, "lr_scale": 0.1,
                                         "weight_decay": 0.0}],
                                freeze=[r"norm/scale"], clip_norm=0.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stacked_update_equals_the_per_layer_one(name):
    c = CONFIGS[name]
    p = params()
    tx_layers, _ = optim.make_optimizer(c, p, 100)
    tx_stacked, _ = optim.make_optimizer(c, p, 100, stack_layers=True)
    assert tx_stacked is not tx_layers
    # Same state tree (so checkpoints and growth cannot tell), same values.
    assert (jax.tree.structure(tx_stacked.init(p)) == jax.tree.structure(tx_layers.init(p)))
    (p1, s1), (p2, s2) = run(c, p, stack=False), run(c, p, stack=True)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    # The same elementwise math on other array shapes: XLA:CPU vectorizes it otherwise, so a
    # last-bit difference (seen: 1 ulp) is all there may be; a global norm (clipping) also
    # sums in another order.
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    moved = {path_str(k): float(np.abs(np.asarray(v - w)).max()) for (k, v), w in
             zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p))}
    assert moved["layers/2/dv/kernel"] > 0
    if c.freeze:
        assert moved["layers/1/norm/scale"] == 0.0


def test_layers_with_different_labels_fall_back_to_per_layer_updates(caplog):
    # A group for layer 1 alone: its labels cannot be stacked, so the update runs per layer.
    c = cfg(groups=[{"pattern": r"^layers/1/", "lr_scale": 0.0, "weight_decay": 0.0}])
    p = params()
    with caplog.at_level("INFO", logger="bigs_jax.train.optim"):
        tx, _ = optim.make_optimizer(c, p, 100, stack_layers=True)
    assert "runs per layer" in caplog.text
    p1, _ = run(c, p, stack=True)
    np.testing.assert_array_equal(p1["layers"][1]["dv"]["kernel"], p["layers"][1]["dv"]["kernel"])
    assert not np.array_equal(p1["layers"][0]["dv"]["kernel"], p["layers"][0]["dv"]["kernel"])


def test_stacks_are_found_where_layers_are_equal_and_round_trip():
    p = params()
    stacks = layer_stack.LayerStacks.find({"backbone": p})
    assert stacks.paths == (("backbone", "layers"),) and stacks.depths == (3,)
    stacked = stacks.stack({"backbone": p})
    assert stacked["backbone"]["layers"]["dv"]["kernel"].shape == (3, 3, 3)
    back = stacks.unstack(stacked)["backbone"]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    # one layer, or layers of other shapes, is no stack
    assert layer_stack.LayerStacks.find(params(depth=1)) is None
    uneven = params()
    uneven["layers"][2]["dv"]["bias"] = jnp.zeros(4)
    assert layer_stack.LayerStacks.find(uneven) is None


def test_scanned_train_step_equals_the_unrolled_one():
    """train.py's step of a scanned model (update on the stacked layers) against the unrolled
    model's (update per layer), with clipping and the norms frozen: same parameters and
    state after two steps, the same gradient norm, and the frozen leaves as they were."""
    c = cfg(freeze=[r"norm/"], clip_norm=1.0)
    states, stats = {}, {}
    for scan in (False, True):
        model = bigs_jax.create("bigs-tiny", num_layers=3, dropout=0.0, scan_layers=scan)
        p = nnx.to_pure_dict(nnx.state(model))
        tx, _ = optim.make_optimizer(c, p, 100, stack_layers=scan)
        assert isinstance(tx, layer_stack.Stacked) == scan
        step = jax.jit(make_train_step(nnx.graphdef(model), tx, MLM,
                                       trainable=optim.trainable_mask(c, p)))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                           rng=jax.random.key_data(jax.random.key(0)))
        for _ in range(2):
            state, stats[scan] = step(state, BATCH)
        states[scan] = state
    assert jax.tree.structure(states[True]) == jax.tree.structure(states[False])
    np.testing.assert_allclose(stats[True]["grad_norm"], stats[False]["grad_norm"], rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(states[False])[0],
                            jax.tree.leaves(states[True])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=path_str(path))
    start = nnx.to_pure_dict(nnx.state(bigs_jax.create("bigs-tiny", num_layers=3)))
    for i in range(3):
        layer_now, layer_then = states[True].params["layers"][i], start["layers"][i]
        np.testing.assert_array_equal(layer_now["norm"]["scale"], layer_then["norm"]["scale"])
        assert np.abs(layer_now["dv"]["kernel"] - layer_then["dv"]["kernel"]).max() > 0
