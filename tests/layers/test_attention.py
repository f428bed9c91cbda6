"""Attention-probability dropout: a fresh mask per element, or one (L, S) mask shared by every
example and head (`broadcast_dropout`, Flax's default and HF Flax's)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers.attention import SelfAttention

B, L, H, K = 3, 16, 4, 2
RATE = 0.5


def dropped_weights(broadcast: bool, seed: int = 0) -> np.ndarray:
    """(B, L, H, L) attention weights after dropout, read off the layer's output.

    Query and key projections are zero, so every query attends uniformly (1/L) to every key;
    head h's value at key s is the one-hot e_s (identity value projection of one-hot inputs)
    and the output projection is the identity, so output (b, t, h, s) is the kept-and-rescaled
    weight of key s for query t in head h.
    """
    layer = SelfAttention(H * L, H, qk_head_dim=K, v_head_dim=L, dropout=RATE,
                          broadcast_dropout=broadcast, rngs=nnx.Rngs(0))
    for proj in (layer.query, layer.key):
        proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
    layer.value.kernel[...] = jnp.eye(H * L)
    layer.out.kernel[...] = jnp.eye(H * L)
    for proj in (layer.query, layer.key, layer.value, layer.out):
        proj.bias[...] = jnp.zeros_like(proj.bias[...])
    # Input channel h*L + s of token s is 1: head h's value at key s is the one-hot e_s.
    x = np.zeros((B, L, H * L), np.float32)
    for s in range(L):
        x[:, s, np.arange(H) * L + s] = 1.0
    out = layer(jnp.asarray(x), deterministic=False, rngs=nnx.Rngs(dropout=seed))
    return np.asarray(out).reshape(B, L, H, L)


@pytest.mark.parametrize("broadcast", [False, True])
def test_attention_dropout_keeps_or_zeroes_each_weight(broadcast):
    w = dropped_weights(broadcast)
    kept = 1.0 / L / (1.0 - RATE)
    np.testing.assert_allclose(w[w > 0], kept, rtol=1e-6)
    assert np.all((w == 0) | np.isclose(w, kept, rtol=1e-6))
    frac = float((w > 0).mean())
    assert abs(frac - (1 - RATE)) < 0.1, frac


def test_broadcast_dropout_shares_one_mask_over_examples_and_heads():
    w = dropped_weights(True) > 0                     # (B, L, H, L) keep pattern
    assert np.array_equal(w, np.broadcast_to(w[:1, :, :1, :], w.shape))
    assert 0 < w.mean() < 1


def test_elementwise_dropout_draws_a_mask_per_example_and_head():
    w = dropped_weights(False) > 0
    assert not np.array_equal(w[0], w[1])              # examples differ
    assert not np.array_equal(w[:, :, 0], w[:, :, 1])  # heads differ


def test_models_pass_the_setting_to_their_attention():
    import bigs_jax

    for name in ("bert-tiny", "gpt2-tiny"):
        for flag in (False, True):
            model = bigs_jax.create(name, attention_dropout_broadcast=flag)
            dims = model.layers[0].mixer.dropout.broadcast_dims
            assert tuple(dims) == ((0, 1) if flag else ()), (name, flag, dims)
