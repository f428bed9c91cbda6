"""The dtype policy (param / compute / output) of every family, and training under it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.models import FAMILIES, family_of
from bigs_jax.train import loop
from tests.runs import smoke

NAMES = ("bigs-tiny", "bert-tiny", "gpt2-tiny", "m2-bert-tiny", "bigs-lm-tiny")


def _ids():
    return jnp.asarray(np.random.RandomState(0).randint(5, 100, (2, 16)))


def _leaves(model):
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("name", NAMES)
def test_param_dtype_stores_params_and_keeps_sensitive_ones_fp32(name):
    ref = bigs_jax.create(name)
    model = bigs_jax.create(name, param_dtype="bfloat16")
    keep = FAMILIES[family_of(model.config).name].fp32_params
    for (path, x), (_, x32) in zip(_leaves(model), _leaves(ref)):
        if any(re.search(k, path) for k in keep):
            assert x.dtype == jnp.float32, path
            np.testing.assert_array_equal(x, x32)
        else:
            assert x.dtype == jnp.bfloat16, path
            # Initialized in fp32 with the same seed, then rounded.
            np.testing.assert_array_equal(x, x32.astype(jnp.bfloat16))
    mask = jnp.ones((2, 16), bool)
    out, out32 = model(_ids(), mask), ref(_ids(), mask)
    assert out.logits.dtype == jnp.float32  # output_dtype defaults to float32
    scale = float(jnp.abs(out32.logits).max())
    err = float(jnp.abs(out.logits - out32.logits).max())
    assert 0 < err < 1e-2 * scale, (err, scale)


@pytest.mark.parametrize("name", NAMES)
def test_compute_and_output_dtype(name):
    model = bigs_jax.create(name, dtype="bfloat16", output_dtype="bfloat16")
    out = model(_ids(), jnp.ones((2, 16), bool))
    assert out.logits.dtype == jnp.bfloat16
    assert out.hidden_states.dtype == jnp.bfloat16
    assert {x.dtype for _, x in _leaves(model)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("field", ["param_dtype", "dtype", "output_dtype"])
def test_unknown_dtype_is_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"unknown {field} 'fp8'"):
        bigs_jax.create("bert-tiny", **{field: "fp8"})


@pytest.mark.slow  # a whole smoke run compiled in bfloat16 (~45 s on 2 busy cores)
def test_training_with_bfloat16_params(tmp_path):
    config = smoke(6)
    config.model.param_dtype = "bfloat16"
    config.model.dtype = "bfloat16"
    summary = loop.train_and_evaluate(config, str(tmp_path))
    losses = summary["eval_loss"]
    assert all(np.isfinite(v) for v in losses.values())
    assert losses[6] < losses[0]
    model = bigs_jax.load(str(tmp_path))
    dtypes = {x.dtype for _, x in _leaves(model)}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
