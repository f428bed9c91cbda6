"""layers.blocks.run_layers with scan=True: one jax.lax.scan over the blocks.

Scanning must change how the stack compiles, never what it computes or what it stores: for
every family, the scanned model has the unrolled one's parameter tree (paths, shapes, values
from the same seed), its jitted deterministic loss equals the unrolled one to fp32 rounding
(rtol 1e-6; bitwise here on XLA:CPU) and its gradients too (rtol 1e-5, atol 1e-6 x the largest
gradient: the remat tests' tolerance). A checkpoint written by an unscanned model restores into
a scanned one with the same outputs, and a run may be resumed with scan_layers switched.
Dropout: each scanned block draws its own mask, from its own split of one key of `rngs`.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.layers.blocks import run_layers
from bigs_jax.train import checkpointing, workdir
from bigs_jax.train.config import model_config

# name -> overrides; three layers so a wrong order or a wrong slice would show
CASES = {
    "bigs": ("bigs-tiny", dict(max_len=16)),
    "bert": ("bert-tiny", dict(max_len=16)),
    "gpt2": ("gpt2-tiny", dict(max_len=16)),
    "bigs-lm": ("bigs-lm-tiny", {}),
    "m2-gpt": ("m2-gpt-tiny", dict(max_len=16)),
    "m2-bert": ("m2-bert-tiny", dict(max_len=16)),
    "vit": ("vit-tiny", dict(head_zero_init=False)),
    "m2-vit": ("m2-vit-tiny", dict(head_zero_init=False)),
}
RNG = np.random.default_rng(0)
IDS = RNG.integers(1, 97, (2, 16))
MASK = np.ones_like(IDS)
MASK[1, 11:] = 0
IMAGES = RNG.random((2, 8, 8, 1)).astype(np.float32)


def _model(family, scan, **extra):
    name, overrides = CASES[family]
    return bigs_jax.create(name, num_layers=3, scan_layers=scan, **overrides, **extra)


def _forward(model):
    if "vit" in type(model).__name__.lower():
        return model(IMAGES).logits
    return model(IDS, MASK).logits


def _jit_forward(model):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: _forward(nnx.merge(graphdef, s)))(state))


def _loss_and_grads(model):
    graphdef, params = nnx.split(model)

    def loss(p):
        return (_forward(nnx.merge(graphdef, p)).astype(jnp.float32) ** 2).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", [
    "bigs", "bert", "gpt2", "m2-gpt", "vit",
    # the layer code of bigs and m2-gpt, causal or bidirectional: with the slow tests
    *[pytest.param(f, marks=pytest.mark.slow) for f in ("bigs-lm", "m2-bert", "m2-vit")]])
def test_scanned_equals_unrolled(family):
    unrolled, scanned = _model(family, False), _model(family, True)
    flat = lambda m: [(p, v[...]) for p, v in nnx.to_flat_state(nnx.state(m))]
    assert [(p, x.shape) for p, x in flat(scanned)] == [(p, x.shape) for p, x in flat(unrolled)]
    for (_, a), (_, b) in zip(flat(unrolled), flat(scanned)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    l0, g0 = _loss_and_grads(unrolled)
    l1, g1 = _loss_and_grads(scanned)
    assert float(l0) > 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    assert scale > 0
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)


def test_scanned_remat_equals_unrolled():
    l0, g0 = _loss_and_grads(_model("gpt2", False))
    l1, g1 = _loss_and_grads(_model("gpt2", True, remat="full"))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)


class _Shift(nnx.Module):
    """A block that shifts its (B, L) input left by one and writes its dropout mask of ones
    (0 or 1/keep) into the last column: after n blocks the last n columns are their masks."""

    def __init__(self):
        self.dropout = nnx.Dropout(0.5)
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x_BL, *, deterministic, rngs):
        drop_B1 = self.dropout(jnp.ones_like(x_BL[:, :1]), deterministic=deterministic,
                               rngs=rngs)
        return jnp.concatenate([x_BL[:, 1:], drop_B1 * self.scale[...]], axis=1)


def test_scanned_dropout_gives_each_block_its_own_key():
    layers = nnx.List([_Shift() for _ in range(4)])
    x_BL = jnp.zeros((256, 4))
    run = lambda scan, key: run_layers(layers, x_BL, rngs=nnx.Rngs(dropout=key), remat="none",
                                       deterministic=False, scan=scan)
    out = np.asarray(jax.jit(lambda k: run(True, k))(jax.random.key(3)))
    # the reference: block i with nnx.Rngs(dropout=split(one draw of rngs.dropout)[i])
    keys = jax.random.split(nnx.Rngs(dropout=jax.random.key(3)).dropout(), 4)
    want = x_BL
    for layer, key in zip(layers, keys):
        want = layer(want, deterministic=False, rngs=nnx.Rngs(dropout=key))
    np.testing.assert_array_equal(out, np.asarray(want))
    assert set(np.unique(out)) == {0.0, 2.0}
    for i in range(4):  # four different masks
        for j in range(i + 1, 4):
            assert (out[:, i] != out[:, j]).mean() > 0.25
    deterministic = run_layers(layers, x_BL, rngs=None, remat="none", deterministic=True,
                               scan=True)
    np.testing.assert_array_equal(np.asarray(deterministic), np.ones((256, 4)))


def test_blocks_of_different_structure_are_refused():
    layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match="layer 1 differs from layer 0; set scan_layers=False"):
        run_layers(layers, jnp.zeros((2, 4)), rngs=None, remat="none", deterministic=True,
                   scan=True)
    layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 5, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match="layer 1 differs from layer 0; set scan_layers=False"):
        run_layers(layers, jnp.zeros((2, 4)), rngs=None, remat="none", deterministic=True,
                   scan=True)


def test_unscanned_checkpoint_restores_into_scanned_model(tmp_path):
    path = str(tmp_path / "run")
    model = _model("gpt2", False)
    os.makedirs(path)
    checkpointing.write_marker(path)
    checkpointing.write_json_atomic(f"{path}/{checkpointing.MODEL_JSON}",
                                    checkpointing.model_json(model.config))
    checkpointing.save_params_only(path, 0, nnx.to_pure_dict(nnx.state(model)))
    want = _jit_forward(bigs_jax.load(path))
    assert np.abs(want).max() > 0

    config = dataclasses.replace(checkpointing.read_model_config(path), scan_layers=True)
    graphdef, abstract = checkpointing.abstract_model(config)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(abstract))
    scanned = nnx.merge(graphdef, checkpointing.restore_params(path, 0, target))
    assert scanned.config.scan_layers
    np.testing.assert_allclose(_jit_forward(scanned), want, rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())

    # a run resumes with scan_layers switched; any change of the parameters is still refused
    workdir.check_same_model(path, config)
    with pytest.raises(workdir.ConfigError, match=r"different model \(differs in \['num_layers'"):
        workdir.check_same_model(path, dataclasses.replace(config, num_layers=2))


@pytest.mark.parametrize("name", [name for name, _ in CASES.values()])
def test_scan_layers_is_a_train_config_option(name):
    assert "scan_layers" in model_config(name)
