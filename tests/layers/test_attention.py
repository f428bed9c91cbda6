"""Attention-probability dropout: a fresh mask per element, or one (L, S) mask shared by every
example and head (`broadcast_dropout`, Flax's default and HF Flax's); and the query-blocked
path without dropout against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers import attention
from bigs_jax.layers.attention import SelfAttention, make_attention_mask

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


# ---------------------------------------------------------------------------- query blocks


def reference_attention(q, k, v, mask):
    """float64 softmax(q kᵀ / sqrt(K)) v of (B, L, H, K) arrays; mask (B|1, 1, L|1, S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -1e300)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhls,bshv->blhv", p / p.sum(-1, keepdims=True), v)


def test_query_block_size():
    fits = attention.SCORE_BLOCK_FLOATS
    assert attention.query_block_size(1, 1, 64, fits // 64) == 64     # everything fits: one block
    assert attention.query_block_size(1, 12, 4096, 4096) == 128       # 25 MB of scores
    assert attention.query_block_size(8, 12, 512, 512) == 128
    assert attention.query_block_size(1, 1, 3 * 4096, 3 * 4096) == 512  # power of 2 dividing L
    assert attention.query_block_size(1, 64, 5 * 8191, 5 * 8191) == 1  # odd L: single queries


@pytest.mark.parametrize("masking", ["none", "padding", "causal_segments"])
def test_query_blocks_equal_the_float64_reference(monkeypatch, masking):
    monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", 2 * 3 * 8 * 48)  # 6 blocks of 8 queries
    B, L, H, K, V = 2, 48, 3, 5, 7
    rng = np.random.default_rng(0)
    q, k = (rng.normal(size=(B, L, H, K)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(B, L, H, V)).astype(np.float32)
    pad = np.ones((B, L), np.int32)
    pad[1, 30:] = 0
    segments = np.array([[1] * 20 + [2] * 28, [1] * 10 + [2] * 20 + [0] * 18])
    mask = {"none": None,
            "padding": make_attention_mask(jnp.asarray(pad), L),
            "causal_segments": make_attention_mask(jnp.asarray(pad), L, causal=True,
                                                   segment_ids_BL=jnp.asarray(segments))}[masking]
    assert attention.query_block_size(B, H, L, L) == 8
    ours = jax.jit(attention.attend_in_query_blocks)(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    real = pad.astype(bool)  # pad queries are never read
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=2e-6, rtol=0)
    whole = jnp.einsum("BHLS,BSHV->BLHV", attention.attention_probs(q, k, mask), v)
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(whole)[real], atol=1e-6,
                               rtol=0)


def test_layer_without_dropout_takes_the_blocked_path(monkeypatch):
    """Without dropout the layer's output does not depend on how its queries are blocked."""
    layer = SelfAttention(24, 3, dropout=0.1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 24)), jnp.float32)
    mask = make_attention_mask(None, 32, causal=True)
    whole = layer(x, mask)
    monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", 2 * 3 * 4 * 32)  # 8 blocks of 4
    blocked = layer(x, mask)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-6, rtol=0)


def test_query_blocks_differentiate_like_the_whole_computation(monkeypatch):
    """Training without attention dropout goes through the blocked path: same gradients."""
    B, L, H, K = 2, 32, 2, 4
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))
    mask = make_attention_mask(None, L, causal=True)
    cotangent = jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32)

    def loss(*qkv):
        return jnp.sum(attention.attend_in_query_blocks(*qkv, mask) * cotangent)

    def grads():
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    whole = grads()
    monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", B * H * 8 * L)  # 4 blocks of 8
    assert attention.query_block_size(B, H, L, L) == 8
    for a, b in zip(grads(), whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
