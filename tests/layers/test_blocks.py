"""layers.blocks: rematerialization and activation sharding constraints at block boundaries.

Remat must not change a number: loss and gradients of GPT-2 and M2 (the families that gained
it with the shared block call) equal the plain run's, jitted. The constraints must not change
outputs either: on an 8-device (data, fsdp, tensor) = (2, 2, 2) mesh, every family's jitted
forward with constraints equals the one without them, and the lowered program really holds
one constraint per block boundary (and none off a mesh).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from tests import runs


REMAT_CASES = {
    "gpt2": ("gpt2-tiny", dict(num_layers=2, dropout=0.0, attention_dropout=0.0)),
    "m2-gpt": ("m2-gpt-tiny", dict(num_layers=1, max_len=24, dropout=0.0)),
    "m2-bert": ("m2-bert-tiny", dict(num_layers=1, max_len=24, dropout=0.0)),
}


def _loss_and_grads(name, overrides, remat, ids, mask):
    graphdef, params = nnx.split(bigs_jax.create(name, remat=remat, **overrides))

    def loss(p):
        return (nnx.merge(graphdef, p)(ids, mask).logits.astype(jnp.float32) ** 2).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family,policy", [
    ("gpt2", "full"), ("gpt2", "dots"), ("m2-gpt", "full"),
    # The same M2 layer code, bidirectional: ~20 s of compiles, so with the slow tests.
    pytest.param("m2-bert", "dots", marks=pytest.mark.slow)])
def test_remat_equals_no_remat(family, policy):
    name, overrides = REMAT_CASES[family]
    ids = np.random.default_rng(0).integers(1, 97, (2, 24))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    l0, g0 = _loss_and_grads(name, overrides, "none", ids, mask)
    l1, g1 = _loss_and_grads(name, overrides, policy, ids, mask)
    assert float(l0) > 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat 'some'; choose one of"):
        bigs_jax.create("gpt2-tiny", remat="some")


# Run in a subprocess with 8 forced host devices: jitted forwards of each family on the
# (2, 2, 2) mesh with the block constraints and without them (the constraint replaced by the
# identity); the lowering off the mesh must hold no constraint. (tests/train/test_sharding.py
# checks that whole runs on meshes match the single-device run.)
_MESH_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import bigs_jax
from bigs_jax.layers import blocks
from bigs_jax.train import partitioning

CASES = {
    "bigs-tiny": dict(max_len=16, dropout=0.0),
    "gpt2-tiny": dict(max_len=16, dropout=0.0, attention_dropout=0.0),
    "m2-bert-tiny": dict(max_len=16, dropout=0.0),
    "vit-tiny": dict(head_zero_init=False),
}
rng = np.random.default_rng(0)
ids = rng.integers(1, 97, (8, 16))
mask = np.ones_like(ids); mask[3, 11:] = 0
images = rng.random((8, 8, 8, 1)).astype(np.float32)
mesh = partitioning.make_mesh((2, 2, 2))
rules = partitioning.DEFAULT_RULES
constrain = blocks.constrain


def forward(name, model, run=True):
    graphdef, state = nnx.split(model)
    if "vit" in name:
        f = lambda s, x: nnx.merge(graphdef, s)(x).logits
        args = (state, images)
    else:
        f = lambda s, x, m: nnx.merge(graphdef, s)(x, m).logits
        args = (state, ids, mask)
    lowered = jax.jit(f).lower(*args)
    text = lowered.as_text()
    # Shardy writes a constraint as sdy.sharding_constraint, GSPMD as a @Sharding custom call.
    count = text.count("sdy.sharding_constraint") + text.count("@Sharding")
    return (np.asarray(lowered.compile()(*args)) if run else None), count


out = {}
for name, kw in CASES.items():
    _, n_single = forward(name, bigs_jax.create(name, **kw), run=False)
    runs = {}
    for constrained in (True, False):
        blocks.constrain = constrain if constrained else (lambda x, axes=None: x)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            runs[constrained] = forward(name, bigs_jax.create(name, **kw))
    blocks.constrain = constrain
    layers = bigs_jax.create(name, **kw).config.num_layers
    out[name] = dict(
        layers=layers, single_constraints=n_single,
        extra_constraints=runs[True][1] - runs[False][1],
        err_constrained_vs_unconstrained=float(np.abs(runs[True][0] - runs[False][0]).max()),
        scale=float(np.abs(runs[False][0]).max()))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_results():
    return runs.on_8_devices(_MESH_SCRIPT)


# ~1 minute (a subprocess compiling 8 forwards); tests/train/test_sharding.py's default
# bigs-tiny (2, 2, 2) run already covers constrained blocks against one device.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["bigs-tiny", "gpt2-tiny", "m2-bert-tiny", "vit-tiny"])
def test_activation_constraints_on_a_mesh_change_no_output(mesh_results, name):
    r = mesh_results[name]
    # Off a mesh the constraint is a no-op; on it, each block's input and output is constrained.
    assert r["single_constraints"] == 0
    assert r["extra_constraints"] == 2 * r["layers"], r
    assert r["scale"] > 0
    assert r["err_constrained_vs_unconstrained"] <= 1e-5 * r["scale"], r
