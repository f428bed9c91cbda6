"""M2-ViT: size, raster-order causality of the Hyena-style mixer, conv modes, the
block-diagonal MLP against a dense reference, gradients and the dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.models import make_config

TINY = dict(num_layers=1, filter_order=8, head_zero_init=False)


def images(b=2, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(b, 8, 8, 1), jnp.float32)


def test_m2_vit_b16_has_half_the_params_of_vit_b16():
    """The paper: M2-ViT-b has about half ViT-b's parameters (45M vs 87M)."""
    c = make_config("m2-vit-b16")
    n = bigs_jax.count_params(nnx.eval_shape(lambda: bigs_jax.create("m2-vit-b16")))
    d, f, o, e = c.hidden_size, c.intermediate_size, c.filter_order, c.filter_emb_dim
    filt = c.num_patches * e + o + d + (e * o + o) + 2 * (o * o + o) + o * d  # causal: one MLP
    mixer = (d * 3 * d + 3 * d) + (5 * 3 * d + 3 * d) + filt + (d * d + d)
    mlp = 2 * (d * f // 4) + f + d                      # 4 diagonal blocks each way + biases
    layer = 4 * d + mixer + mlp                          # + two LayerNorms
    expect = (16 * 16 * 3 * d + d) + 12 * layer + 2 * d + (d * 1000 + 1000)
    assert n == expect == 45_830_680
    vit_b = bigs_jax.count_params(nnx.eval_shape(lambda: bigs_jax.create("vit-b16")))
    assert 0.5 < n / vit_b < 0.55


def test_position_embeddings_add_one_vector_per_patch():
    """position_embeddings=True (the yaml's use_pos_embed) adds a learned (N, D) table to the
    patch embeddings, broadcast over the batch (the suite raises on rank promotion)."""
    model = bigs_jax.create("m2-vit-tiny", position_embeddings=True, **TINY)
    table = np.asarray(model.position[...])
    assert table.shape == (16, 64) and np.abs(table).max() > 0
    with_pos = np.asarray(model(images()).hidden_states)
    model.position[...] = jnp.zeros_like(model.position[...])
    without = np.asarray(model(images()).hidden_states)
    assert np.abs(with_pos - without).max() > 1e-3  # the table reaches every patch's state


def _patch_dependence(model):
    """(t, s) = |d hidden_states[0, t] / d patch s| summed over pixels, for the 16 2x2 patches."""
    w = jax.random.normal(jax.random.key(1), (model.config.hidden_size,))
    jac = jax.jit(jax.jacrev(lambda x: model(x).hidden_states[0] @ w))(images(1))  # (16,1,8,8,1)
    return np.abs(np.asarray(jac)).reshape(16, 4, 2, 4, 2).sum((2, 4)).reshape(16, 16)


def test_causal_along_the_raster_patch_order():
    """Default (the Hyena ViT): patch t's state depends on patches s <= t only, exactly."""
    model = bigs_jax.create("m2-vit-tiny", conv_mode="toeplitz", **TINY)
    dep = _patch_dependence(model)
    future = np.triu(np.ones((16, 16), bool), k=1)
    assert np.all(dep[future] == 0.0)
    assert np.all(dep[~future] > 0)


def test_bidirectional_sees_every_patch():
    model = bigs_jax.create("m2-vit-tiny", bidirectional=True, residual_long_conv=True, **TINY)
    assert np.all(_patch_dependence(model) > 0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_conv_modes_agree(bidirectional):
    """The long conv by FFT, by Monarch DFT and as a dense Toeplitz matrix give one model, and
    so do the matmul modes at conv_precision bf16_3x; bf16 (one bf16 product) reaches the
    mixer too: it moves the logits 10x more than bf16_3x does."""
    outs = {}
    for mode, precision in (("fft", "fp32"), ("monarch", "fp32"), ("toeplitz", "fp32"),
                            ("monarch", "bf16_3x"), ("toeplitz", "bf16_3x"),
                            ("monarch", "bf16")):
        model = bigs_jax.create("m2-vit-tiny", conv_mode=mode, conv_precision=precision,
                                bidirectional=bidirectional, **TINY)
        outs[mode, precision] = np.asarray(jax.jit(lambda x, m=model: m(x).logits)(images()))
    ref = outs["toeplitz", "fp32"]
    assert np.abs(ref).max() > 0.1
    for key in (("fft", "fp32"), ("monarch", "fp32"), ("monarch", "bf16_3x"),
                ("toeplitz", "bf16_3x")):
        np.testing.assert_allclose(outs[key], ref, atol=1e-4)
    err = lambda key: np.abs(outs[key] - outs["monarch", "fp32"]).max()
    assert err(("monarch", "bf16")) > 10 * err(("monarch", "bf16_3x")) > 0


def test_blockdiag_mlp_equals_dense_reference():
    """The MLP is ViT's with block-diagonal matrices: compare with the dense matrices."""
    model = bigs_jax.create("m2-vit-tiny", **TINY)
    mlp = model.layers[0].mlp
    x = np.random.RandomState(0).randn(3, 16, 64).astype(np.float32)

    def dense(k_KPQ):
        k = np.asarray(k_KPQ, np.float64)
        K, P, Q = k.shape
        m = np.zeros((K * P, K * Q))
        for b in range(K):
            m[b * P:(b + 1) * P, b * Q:(b + 1) * Q] = k[b]
        return m

    from scipy.special import erf

    h = x @ dense(mlp.up.kernel[...]) + np.asarray(mlp.up.bias[...])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    ref = h @ dense(mlp.down.kernel[...]) + np.asarray(mlp.down.bias[...])
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), ref, atol=1e-4)
    assert mlp.up.kernel.shape == (4, 16, 64)  # 4 blocks: a quarter of the dense 64x256


def test_gradients_reach_every_parameter_and_training_fits_a_batch():
    model = bigs_jax.create("m2-vit-tiny", residual_long_conv=True, **TINY)
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = images(8), jnp.arange(8) % 10

    @jax.jit
    def loss_grad(p):
        def loss(p):
            logits = nnx.merge(graphdef, p)(x).logits
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()
        return jax.value_and_grad(loss)(p)

    first, grads = loss_grad(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    loss = first
    for _ in range(40):  # memorize 8 images
        loss, grads = loss_grad(params)
        updates, opt = tx.update(grads, opt)
        params = optax.apply_updates(params, updates)
    assert float(loss) < 0.1 * float(first)


def test_dtype_policy_keeps_filters_fp32():
    ref = bigs_jax.create("m2-vit-tiny", **TINY)
    bf = bigs_jax.create("m2-vit-tiny", param_dtype="bfloat16", dtype="bfloat16", **TINY)
    for path, p in jax.tree_util.tree_leaves_with_path(nnx.state(bf, nnx.Param)):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        assert p.dtype == (jnp.float32 if "filter_fn" in name else jnp.bfloat16), name
    out = jax.jit(lambda x: bf(x).logits)(images())
    out32 = jax.jit(lambda x: ref(x).logits)(images())
    assert out.dtype == jnp.float32
    err = float(jnp.abs(out - out32).max())
    assert 0 < err < 5e-2 * float(jnp.abs(out32).max())


def test_remat_equals_no_remat(jitted):
    x = images()
    a = jitted(bigs_jax.create("m2-vit-tiny", **TINY))(x).logits
    b = jitted(bigs_jax.create("m2-vit-tiny", remat="full", **TINY))(x).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
