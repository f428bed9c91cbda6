"""Optimizer construction: schedules, weight-decay masks, per-group lr, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from bigs_jax.train import optim
from bigs_jax.train.config import NO_DECAY, SSM_PARAMS


def cfg(**kw):
    base = dict(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1, b1=0.9,
                b2=0.98, eps=1e-6, weight_decay=0.0, clip_norm=0.0, no_decay=list(NO_DECAY),
                groups=[], freeze=[])
    return ConfigDict({**base, **kw})


def test_warmup_then_cosine_to_end_ratio():
    s = optim.schedule(cfg(), total_steps=110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-6)
    lin = optim.schedule(cfg(schedule="linear"), total_steps=110)
    np.testing.assert_allclose([lin(10), lin(60), lin(110)], [1.0, 0.55, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown optim.schedule 'cosin'"):
        optim.schedule(cfg(schedule="cosin"), 10)


PARAMS = {
    "layers": {0: {"fs4": {"A_re": jnp.ones(4), "C": jnp.ones((4, 2))},
                   "dv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
                   "norm": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}},
}


def one_step(c, grads_value=0.0):
    tx, _ = optim.make_optimizer(c, PARAMS, total_steps=100)
    state = tx.init(PARAMS)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    return {optim.path_str(p): np.asarray(u) for p, u in
            jax.tree_util.tree_flatten_with_path(updates)[0]}


def test_weight_decay_skips_biases_and_norms():
    # Zero gradients and no warmup: the whole update is decoupled decay, -lr * wd * p.
    u = one_step(cfg(weight_decay=0.5, warmup_steps=0))
    assert np.allclose(u["layers/0/dv/kernel"], -0.5)
    assert np.allclose(u["layers/0/fs4/A_re"], -0.5)
    for name in ("layers/0/dv/bias", "layers/0/norm/scale", "layers/0/norm/bias"):
        assert np.allclose(u[name], 0.0), name


def test_groups_scale_lr_and_freeze_masks_updates():
    c = cfg(warmup_steps=0, groups=[{"pattern": SSM_PARAMS, "lr_scale": 0.1,
                                     "weight_decay": 0.0}], freeze=[r"norm/"])
    u = one_step(c, grads_value=1.0)
    # Adam's first step moves every trainable leaf by lr (the normalized gradient is 1).
    assert np.allclose(u["layers/0/dv/kernel"], -1.0, rtol=1e-4)
    assert np.allclose(u["layers/0/fs4/A_re"], -0.1, rtol=1e-4)   # 0.1x group
    assert np.allclose(u["layers/0/fs4/C"], -1.0, rtol=1e-4)      # C is not in the group
    assert np.allclose(u["layers/0/norm/scale"], 0.0)             # frozen


def test_mesh_shapes_resolve_and_bad_ones_fail_clearly():
    from bigs_jax.train import partitioning

    assert partitioning.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        partitioning.mesh_shape((3, 2, 1), 8)
    with pytest.raises(ValueError, match="more than one -1"):
        partitioning.mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="dcn_shape .* must divide"):
        partitioning.make_mesh((1, 1, 1), dcn_shape=(2, 1, 1))


def test_rewarm_ramps_the_lr_after_each_restart_and_leaves_earlier_steps():
    base = optim.schedule(cfg(warmup_steps=0, schedule="constant"), total_steps=100)
    s = optim.rewarmed(base, [(20, 4), (50, 2)])
    counts = [0, 19, 20, 21, 23, 24, 49, 50, 51, 99]
    np.testing.assert_allclose([float(s(jnp.asarray(c))) for c in counts],
                               [1, 1, 0.25, 0.5, 1, 1, 1, 0.5, 1, 1], rtol=1e-6)
    assert optim.rewarmed(base, []) is base


def test_rewarm_scales_the_first_adam_update_after_growth():
    # The optimizer's own count drives the ramp: at count 20 (the first update after growth at
    # step 20) Adam's update is 1/4 of the un-re-warmed one, at count 23 the same again.
    c = cfg(warmup_steps=0, schedule="constant")
    grads = jax.tree.map(jnp.ones_like, PARAMS)

    def update_at(count, restarts):
        tx, _ = optim.make_optimizer(c, PARAMS, 100, restarts)
        state = tx.init(PARAMS)
        state = jax.tree.map(lambda x: jnp.full_like(x, count) if x.dtype == jnp.int32 else x,
                             state)
        return np.asarray(tx.update(grads, state, PARAMS)[0]["layers"][0]["dv"]["kernel"])

    for count, ratio in ((19, 1.0), (20, 0.25), (23, 1.0)):
        np.testing.assert_allclose(update_at(count, [(20, 4)]), ratio * update_at(count, []),
                                   rtol=1e-6)
