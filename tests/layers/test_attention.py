"""Attention: dropout on the probabilities (a fresh mask per element, or one (L, S) mask shared
by every example and head: `broadcast_dropout`, Flax's default and HF Flax's); the blocked
online-softmax kernel against a float64 reference, forward and backward, with every mask form
and with dropout; its memory, linear in L; the kernel choice per backend, and the TPU and GPU
kernels' call paths run on CPU (splash in interpret mode, the cuDNN call's arguments through
jax's XLA implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers import attention, flash
from bigs_jax.layers.attention import AttentionMask, SelfAttention, make_attention_mask

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


# ---------------------------------------------------------------------------- blocked kernel


def reference(q, k, v, dense, keep=None):
    """float64 softmax(q kᵀ / sqrt(K)) v of (B, L, H, K) arrays under a dense (B|1, 1, L, S)
    mask, probabilities times `keep` (B|1, H|1, L, S) where given; differentiable."""
    q, k, v = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
    logits = jnp.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    if dense is not None:
        logits = jnp.where(dense, logits, -1e300)
    probs = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        probs = probs * keep
    return jnp.einsum("bhls,bshv->blhv", probs, v)


def qkv_and_masks(B=2, L=48, H=3, K=5, V=7, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(B, L, H, K)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(B, L, H, V)).astype(np.float32)
    pad = np.ones((B, L), bool)
    pad[1, 30:] = False
    segments = jnp.asarray([[1] * 20 + [2] * 28, [1] * 10 + [2] * 20 + [0] * 18])
    masks = {"none": None,
             "padding": make_attention_mask(jnp.asarray(pad), L),
             "causal": make_attention_mask(None, L, causal=True),
             "causal_segments_padding": make_attention_mask(
                 jnp.asarray(pad), L, causal=True, segment_ids_BL=segments)}
    return (q, k, v), pad, masks, rng


@pytest.mark.parametrize("masking", ["none", "padding", "causal", "causal_segments_padding"])
@pytest.mark.parametrize("blocks", [(8, 16), (7, 10), (48, 48)])
def test_blocked_kernel_equals_the_float64_reference(masking, blocks):
    """Forward within 2e-6 and gradients within 1e-5 of float64, whole tiles, ragged last
    tiles (7 x 10 blocks of 48 queries and keys) and one tile; causal tiles are skipped."""
    (q, k, v), pad, masks, rng = qkv_and_masks()
    mask = masks[masking]
    L = q.shape[1]
    cotangent = rng.normal(size=(*q.shape[:3], v.shape[-1])) * pad[:, :, None, None]

    def ours(q, k, v):
        m = mask or AttentionMask()
        return flash.flash_attention(q, k, v, flash.Masks(m.key_BS, m.segment_ids_BL,
                                                          m.segment_ids_BL),
                                     causal=m.causal, blocks=blocks)

    def loss(f):
        return lambda *qkv: jnp.sum(f(*qkv) * cotangent.astype(np.float32))

    out = jax.jit(ours)(q, k, v)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64():
        dense = None if mask is None else mask.dense(L, L)
        want = reference(q, k, v, dense)
        want_grads = jax.grad(lambda *qkv: jnp.sum(reference(*qkv, dense) * cotangent),
                              argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(want)[pad], atol=2e-6, rtol=0)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


def test_blocked_kernel_keeps_float64_and_fp32_statistics_for_bf16():
    (q, k, v), pad, masks, _ = qkv_and_masks()
    mask = masks["causal_segments_padding"]
    with jax.enable_x64():
        q64, k64, v64 = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
        out = attention.dot_product_attention(q64, k64, v64, mask)
        assert out.dtype == jnp.float64
        want = reference(q64, k64, v64, mask.dense(48, 48))
        np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(want)[pad], atol=1e-13)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    out = attention.dot_product_attention(*bf, mask)
    assert out.dtype == jnp.bfloat16
    with jax.enable_x64():
        want = reference(*(np.asarray(a, np.float64) for a in bf), mask.dense(48, 48))
    # bf16 inputs, fp32 softmax: only the probabilities' cast to bf16 for the p·v matmul and
    # the output's rounding remain (~3 bf16 ulps of values of size ~1).
    np.testing.assert_allclose(np.asarray(out, np.float32)[pad], np.asarray(want)[pad],
                               atol=3e-2, rtol=0)


@pytest.mark.parametrize("broadcast", [False, True])
def test_dropout_inside_the_kernel_regenerates_its_masks_in_the_backward(broadcast):
    """With dropout, forward and gradients equal the float64 reference under the masks the
    tiles draw (each from the key folded with its block indices)."""
    (q, k, v), pad, masks, rng = qkv_and_masks()
    mask, (B, L, H, _), rate, blocks = masks["causal_segments_padding"], q.shape, 0.3, (8, 16)
    key = jax.random.key(7)
    static = flash.Static(True, rate, broadcast, *blocks)
    keep = np.block([[np.asarray(flash._tile_keep(key, i, j, (B, H, 8, 16), static))
                      for j in range(3)] for i in range(6)])
    assert keep.shape == ((1, 1) if broadcast else (B, H)) + (L, L)
    assert 0.55 < (keep > 0).mean() < 0.85
    cotangent = rng.normal(size=(B, L, H, v.shape[-1])) * pad[:, :, None, None]
    m = flash.Masks(mask.key_BS, mask.segment_ids_BL, mask.segment_ids_BL)

    def ours(q, k, v):
        return flash.flash_attention(q, k, v, m, causal=True, dropout_rate=rate,
                                     dropout_key=key, broadcast_dropout=broadcast,
                                     blocks=blocks)

    out = jax.jit(ours)(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent.astype(np.float32)),
                     argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64():
        dense = mask.dense(L, L)
        want = reference(q, k, v, dense, keep)
        want_grads = jax.grad(lambda *a: jnp.sum(reference(*a, dense, keep) * cotangent),
                              argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(want)[pad], atol=2e-6, rtol=0)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


def compiled_temp_bytes(L: int, blocks) -> int:
    """Temporary bytes of the compiled forward + backward of one (1, L, 2, 16) attention."""
    x = jax.ShapeDtypeStruct((1, L, 2, 16), jnp.float32)
    mask = make_attention_mask(jnp.ones((1, L), bool), L)
    m = flash.Masks(mask.key_BS)
    loss = lambda q, k, v: jnp.sum(flash.flash_attention(q, k, v, m, blocks=blocks))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_forward_backward_memory_is_linear_in_the_length():
    """Doubling L doubles the compiled temporaries (a dense softmax would quadruple them:
    its (L, L) scores alone are 4 L² bytes per head), and they stay far below one score
    matrix."""
    small, large = (compiled_temp_bytes(L, (64, 128)) for L in (1024, 2048))
    assert large / small < 2.3, (small, large)
    assert large < 2 * 2048 * 2048 * 4 / 4, large  # a quarter of the (2, L, L) fp32 scores


def test_layer_output_does_not_depend_on_the_blocking(monkeypatch):
    layer = SelfAttention(24, 3, dropout=0.1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 24)), jnp.float32)
    mask = make_attention_mask(None, 32, causal=True)
    whole = layer(x, mask)
    monkeypatch.setattr(flash, "TILE_FLOATS", 2 * 3 * 4 * 8)  # tiles of 4 queries x 8 keys
    monkeypatch.setattr(flash, "KEY_BLOCK", 8)
    assert flash.block_sizes(2, 3, 32, 32) == (4, 8)
    blocked = layer(x, mask)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-6, rtol=0)


def test_block_sizes():
    assert flash.block_sizes(1, 12, 64, 64) == (64, 64)           # one tile
    assert flash.block_sizes(1, 12, 512, 512) == (256, 512)       # 2**21 scores at most
    assert flash.block_sizes(1, 12, 4096, 4096) == (256, 512)     # 341 fit; a power of two
    assert flash.block_sizes(1, 12, 2048, 2048) == (256, 512)
    assert flash.block_sizes(1, 12, 1000, 1000) == (256, 504)     # 4 x 250 -> multiples of 8
    assert flash.block_sizes(1, 12, 1200, 1200) == (240, 400)     # equal blocks under 256
    assert flash.block_sizes(1, 12, 1, 4096) == (1, 512)          # one decoding query
    assert flash.block_sizes(64, 64, 4096, 4096) == (1, 512)      # at least one query


# ---------------------------------------------------------------------------- kernel choice


def test_choose_kernel_by_backend_and_inputs():
    pad = make_attention_mask(jnp.ones((1, 256), bool), 256, causal=True)
    seg = make_attention_mask(None, 256, segment_ids_BL=jnp.ones((1, 256), jnp.int32))
    decode = AttentionMask(positions_BL=jnp.zeros((1, 1), jnp.int32), causal=True)
    bf16, f32 = jnp.bfloat16, jnp.float32
    choose = attention.choose_kernel
    assert choose("cpu", bf16, 64, 64, 256, 256, pad, False) == ("blocked", "")
    assert choose("gpu", bf16, 64, 64, 256, 256, pad, False) == ("cudnn", "")
    assert choose("gpu", bf16, 64, 64, 256, 256, None, False) == ("cudnn", "")
    for args in [(f32, 64, 64, 256, 256, pad, False),     # cuDNN flash is fp16/bf16
                 (bf16, 64, 32, 256, 256, pad, False),    # K != V
                 (bf16, 256, 256, 256, 256, pad, False),  # head dim over 128
                 (bf16, 64, 64, 256, 256, seg, False),    # segment ids
                 (bf16, 64, 64, 256, 256, pad, True),     # dropout
                 (bf16, 64, 64, 1, 256, decode, False)]:  # decoding against a cache
        kernel, why = choose("gpu", *args)
        assert kernel == "blocked" and why, args
    assert choose("tpu", bf16, 128, 128, 256, 256, seg, False) == ("splash", "")
    assert choose("tpu", f32, 64, 64, 256, 256, pad, False) == ("splash", "")
    assert choose("tpu", bf16, 64, 64, 200, 200, pad, False)[0] == "blocked"
    assert choose("tpu", bf16, 64, 64, 256, 256, pad, True)[0] == "blocked"


def test_fallback_is_logged_once_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention._log_fallback.cache_clear()
    (q, k, v), _, masks, _ = qkv_and_masks()
    with caplog.at_level("INFO", logger=attention.__name__):
        for _ in range(2):
            attention.dot_product_attention(q, k, v, masks["padding"])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attention: blocked XLA kernel instead of the fused one: cuDNN needs "
                     "fp16/bf16 and K = V, a multiple of 8 up to 128 (got float32, K=5, V=7)"]


def test_unknown_kernel_is_refused():
    (q, k, v), _, _, _ = qkv_and_masks()
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'; choose one of"):
        attention.dot_product_attention(q, k, v, kernel="flash")


@pytest.mark.parametrize("masking", ["none", "padding", "causal_segments_padding"])
def test_splash_kernel_in_interpret_mode_equals_the_reference(masking):
    """The TPU path (Pallas splash attention) run by the Pallas interpreter on CPU."""
    (q, k, v), pad, _, _ = qkv_and_masks(B=2, L=256, H=2, K=64, V=64)
    segments = jnp.asarray(np.repeat([[1, 2], [1, 0]], [100, 156], axis=1))
    pad[1, 100:] = False
    mask = {"none": None,
            "padding": make_attention_mask(jnp.asarray(pad), 256),
            "causal_segments_padding": make_attention_mask(
                jnp.asarray(pad), 256, causal=True, segment_ids_BL=segments)}[masking]
    out = attention.splash_attention(q, k, v, mask or AttentionMask(), interpret=True)
    with jax.enable_x64():
        want = reference(q, k, v, None if mask is None else mask.dense(256, 256))
    np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(want)[pad], atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_cudnn_call_arguments_mean_the_mask(causal, padding):
    """The GPU path's `jax.nn.dot_product_attention` arguments (key counts for right padding,
    is_causal), run through jax's XLA implementation on CPU; a left-padded batch goes to the
    fallback (here a marker: all outputs 7)."""
    (q, k, v), pad, _, _ = qkv_and_masks(K=8, V=8)
    if padding == "left":
        pad = pad[:, ::-1].copy()
    mask = make_attention_mask(jnp.asarray(pad), 48, causal=causal)
    out = jax.jit(lambda q, k, v: attention.jax_attention(
        q, k, v, mask, implementation="xla", otherwise=lambda q, k, v: jnp.full_like(q, 7)))(
            q, k, v)
    if padding == "left":
        np.testing.assert_array_equal(np.asarray(out), 7)
        return
    with jax.enable_x64():
        want = reference(q, k, v, mask.dense(48, 48))
    np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(want)[pad], atol=2e-6, rtol=0)
