"""Long convolutions, implicit filter and short conv of M2 against direct numpy formulas; the
matmul paths (Monarch DFT, Toeplitz) at each precision against the fp32 FFT path."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers.longconv import (
    ImplicitFilter,
    ShortConv,
    long_conv,
    modulation_deltas,
    positional_features,
    resolve_conv_mode,
)
from tests import runs


def direct_conv(u_BLD, kf_LD, kr_LD=None):
    """y[t] = Σ_{s≤t} kf[t-s] u[s] + Σ_{s>t} kr[s-t-1] u[s] (research/m2.md §2.1)."""
    B, L, D = u_BLD.shape
    y = np.zeros((B, L, D))
    for t in range(L):
        for s in range(L):
            if s <= t:
                y[:, t] += kf_LD[t - s] * u_BLD[:, s]
            elif kr_LD is not None:
                y[:, t] += kr_LD[s - t - 1] * u_BLD[:, s]
    return y


@pytest.mark.parametrize("mode", ["fft", "monarch", "toeplitz"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_long_conv_matches_direct_sum(mode, bidirectional):
    rng = np.random.default_rng(0)
    u, kf, kr = rng.normal(size=(2, 12, 3)), rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    kr = kr if bidirectional else None
    y = long_conv(jnp.asarray(u, jnp.float32), jnp.asarray(kf, jnp.float32),
                  None if kr is None else jnp.asarray(kr, jnp.float32), mode=mode)
    np.testing.assert_allclose(np.asarray(y), direct_conv(u, kf, kr), atol=2e-5)


def test_official_2l_kernel_trick_equals_direct_sum():
    """The official rfft(k=[kf,0]+[0,flip(kr)], 2L) form (numpy) is our direct formula."""
    rng = np.random.default_rng(1)
    L = 10
    u, kf, kr = rng.normal(size=(1, L, 2)), rng.normal(size=(L, 2)), rng.normal(size=(L, 2))
    k = np.concatenate([kf, 0 * kf]) + np.concatenate([0 * kr, kr[::-1]])
    k_f = np.fft.rfft(k, n=2 * L, axis=0) / (2 * L)
    y = np.fft.irfft(np.fft.rfft(u, n=2 * L, axis=1) * k_f, n=2 * L, axis=1, norm="forward")
    np.testing.assert_allclose(y[:, :L], direct_conv(u, kf, kr), atol=1e-12)


def test_positional_features_and_deltas():
    z = positional_features(8, 5)
    w = 2 * np.pi * np.arange(8) / 8
    np.testing.assert_allclose(z[:, 0], np.linspace(0, 1, 8), atol=1e-7)
    np.testing.assert_allclose(z[:, 1:3], np.cos(np.outer(w, [1e-4, 1.0])), atol=1e-6)
    np.testing.assert_allclose(z[:, 3:5], -np.sin(np.outer(w, [1e-4, 1.0])), atol=1e-6)
    d = modulation_deltas(4)
    np.testing.assert_allclose(d[[0, -1]], [math.log(1e-2) / 1.5, math.log(1e-2) / 0.3],
                               rtol=1e-6)


def test_implicit_filter_matches_numpy_reference():
    f = ImplicitFilter(6, l_max=16, order=8, emb_dim=5, w=10.0, rngs=nnx.Rngs(0))
    p = lambda x: np.asarray(x[...], np.float64)
    L = 11
    z, t = positional_features(16)[:L].astype(np.float64), np.linspace(0, 1, 16)[:L, None]
    decay = np.exp(-t * np.abs(modulation_deltas(6).astype(np.float64)))

    def mlp(layers):
        h = z
        for i, layer in enumerate(layers):
            h = h @ p(layer.kernel) + (p(layer.bias) if layer.bias is not None else 0)
            if i < 3:
                h = np.sin(p(f.freq) * h)
        return h * decay

    kf, kr = f.kernels(L)
    # atol 1e-5: fp32 round-off is amplified by the sin(10x) activations.
    np.testing.assert_allclose(np.asarray(kf), mlp(f.implicit_filter), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kr), mlp(f.implicit_filter_rev), rtol=1e-5, atol=1e-5)
    u = np.random.default_rng(0).normal(size=(2, L, 6))
    y = f(jnp.asarray(u, jnp.float32))
    ref = direct_conv(u, mlp(f.implicit_filter), mlp(f.implicit_filter_rev)) + p(f.bias) * u
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_short_conv_is_torch_conv1d_padding_k_minus_1_cropped():
    conv = ShortConv(4, 3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 7, 4))
    w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])  # w[j] = torch weight[:,0,j]
    xp = np.pad(x, ((0, 0), (2, 2), (0, 0)))
    ref = np.stack([sum(w[j] * xp[:, t + j] for j in range(3)) + b for t in range(7)], axis=1)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x, jnp.float32))), ref, atol=1e-5)
    g = jax.grad(lambda x: conv(x)[0, 3].sum())(jnp.asarray(x, jnp.float32))
    assert np.all(np.asarray(g)[0, 4:] == 0) and np.all(np.asarray(g)[0, 1:4] != 0)


@pytest.mark.parametrize("mode", ["fft", "monarch", "toeplitz"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_channel_major_filter_and_short_conv_equal_last_axis_layout(mode, bidirectional):
    # `channel_major` on (B, D, L) is `__call__` on (B, L, D), transposed
    filt = ImplicitFilter(4, l_max=16, order=8, bidirectional=bidirectional, rngs=nnx.Rngs(0))
    conv = ShortConv(4, 3, rngs=nnx.Rngs(1))
    u_BLD = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 4)), jnp.float32)
    u_BDL = jnp.swapaxes(u_BLD, 1, 2)
    ref, got = filt(u_BLD, mode=mode), jnp.swapaxes(filt.channel_major(u_BDL, mode=mode), 1, 2)
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(jnp.swapaxes(conv.channel_major(u_BDL), 1, 2), conv(u_BLD),
                               rtol=1e-6, atol=1e-6)


# ---- matmul paths: precision against the fp32 FFT -----------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _filter_channel_major(graph, state, u_BDL, mode, precision):
    return nnx.merge(graph, state).channel_major(u_BDL, mode=mode, precision=precision)


def rel_err(got, ref):
    """max |got - ref| / max |ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def matmul_path_errors(mode, L, bidirectional, D):
    """Relative error of `mode` at each precision against the fp32 FFT path, and of that FFT
    path against a float64 FFT convolution with the same (float32) kernel. The filter is
    M2-BERT's (order 128, emb_dim 5, w 10, decays laid out over D channels), as M2 runs it:
    channel-major."""
    filt = ImplicitFilter(D, l_max=L, order=128, bidirectional=bidirectional,
                          rngs=nnx.Rngs(L + D))
    u_BDL = np.random.default_rng(L).normal(size=(2, D, L)).astype(np.float32)
    graph, state = nnx.split(filt)
    fft = np.asarray(_filter_channel_major(graph, state, u_BDL, "fft", "fp32"), np.float64)
    k_DN = np.asarray(filt.circular_kernel(L), np.float64)
    u64 = u_BDL.astype(np.float64)
    ref = (np.fft.irfft(np.fft.rfft(u64, 2 * L) * np.fft.rfft(k_DN, 2 * L), 2 * L)[..., :L]
           + np.asarray(filt.bias[...], np.float64)[None, :, None] * u64)
    errs = {p: rel_err(_filter_channel_major(graph, state, u_BDL, mode, p), fft)
            for p in ("fp32", "bf16_3x", "bf16")}
    return errs, rel_err(fft, ref)


@pytest.mark.parametrize("mode,L,D", [("monarch", 2048, 64), ("monarch", 1000, 64),
                                      ("toeplitz", 1000, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_matmul_paths_precisions_against_fft(mode, L, D, bidirectional):
    """bf16_3x equals the fp32 FFT path within 1e-4 of max |y| (issue 18's acceptance;
    measured 7.0e-6 to 1.0e-5 monarch, 4.3e-6 to 4.5e-6 toeplitz); fp32 within 1e-5 (3.0e-7
    to 8.8e-7); bf16, one bf16 product per real product, measured 4.6e-3 to 7.2e-3 monarch,
    1.9e-3 to 2.1e-3 toeplitz, bounded at 1e-2. The FFT path itself is within 2.5e-7 of a
    float64 FFT. L = 2048 (n_fft 4096: a complex DFT of 2048 = 64 x 32) and L = 1000 (2000:
    40 x 25, no power of two)."""
    errs, fft_err = matmul_path_errors(mode, L, bidirectional, D)
    assert fft_err < 1e-6, fft_err
    assert errs["fp32"] < 1e-5, errs
    assert errs["bf16_3x"] < 1e-4, errs
    assert 10 * errs["bf16_3x"] < errs["bf16"] < 1e-2, errs


def test_auto_mode_and_bad_precision():
    assert resolve_conv_mode("auto") == ("fft" if jax.default_backend() == "cpu" else "monarch")
    assert resolve_conv_mode("toeplitz") == "toeplitz"
    u, k = jnp.ones((1, 4, 2)), jnp.ones((4, 2))
    with pytest.raises(ValueError, match="long-conv precision 'tf32'.*bf16_3x"):
        long_conv(u, k, mode="monarch", precision="tf32")
    with pytest.raises(ValueError, match="long-conv mode 'dft'"):
        long_conv(u, k, mode="dft")


@pytest.mark.parametrize("mode", ["monarch", "toeplitz"])
def test_matmul_paths_gradients_at_each_precision(mode):
    """The backward pass runs at the forward's level (`precision.dot`'s VJP): bf16_3x gradients
    w.r.t. the input and both kernels equal the fp32 FFT path's within 1e-4 of their max
    (measured 4.8e-6 to 8.2e-6; left to autodiff, bf16 cotangents made them ~3e-3), and one
    bf16 product is 10x worse or more (2.2e-3 to 5.7e-3)."""
    rng = np.random.default_rng(7)
    L = 512
    u, c = (jnp.asarray(rng.normal(size=(2, L, 8)), jnp.float32) for _ in range(2))
    decay_L1 = np.exp(-np.arange(L) / 200)[:, None]
    kf, kr = (jnp.asarray(rng.normal(size=(L, 8)) * decay_L1, jnp.float32) for _ in range(2))

    def grads(mode, precision):
        loss = lambda *a: jnp.sum(long_conv(*a, mode=mode, precision=precision) * c)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(u, kf, kr)

    ref = grads("fft", "fp32")
    errs = {p: max(rel_err(g, r) for g, r in zip(grads(mode, p), ref, strict=True))
            for p in ("fp32", "bf16_3x", "bf16")}
    assert errs["fp32"] < 1e-5 and errs["bf16_3x"] < 1e-4, errs
    assert 10 * errs["bf16_3x"] < errs["bf16"] < 1e-2, errs


_MESH_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from bigs_jax.layers.longconv import ImplicitFilter
from bigs_jax.train.partitioning import DEFAULT_RULES, make_mesh
g, state = nnx.split(ImplicitFilter(16, l_max=12, rngs=nnx.Rngs(0)))
u = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 12)), jnp.float32)
out = {}
for method in ("channel_major", "__call__"):
    x = u if method == "channel_major" else jnp.swapaxes(u, 1, 2)
    loss = lambda s, x: jnp.sum(getattr(nnx.merge(g, s), method)(x) ** 2)
    ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    mesh = make_mesh((2, 2, 2))
    # channels tensor-sharded, as the M2 mixer's in_linear (kernel axes embed, mlp) leaves them
    spec = (("data", "fsdp"), "tensor", None) if x is u else (("data", "fsdp"), None, "tensor")
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        gathers = grad.lower(state, x).compile().as_text().count("all-gather(")
        got = jax.device_get(grad(state, x))
    err = max(float(np.abs(a - b).max() / np.abs(a).max())
              for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    out[method] = {"err": err, "gathers": gathers}
print(json.dumps(out))
"""


def test_long_conv_gradients_on_a_tensor_parallel_mesh():
    # XLA's partitioner all-gathers an FFT's operand even when only its channels are sharded,
    # and XLA:CPU's FFT then fails its layout check in the backward pass (a RET_CHECK that
    # crashed M2 training on any mesh with tensor > 1); blocks.per_shard runs each shard's FFTs
    # locally. 8 CPU devices in a subprocess, mesh (data, fsdp, tensor) = (2, 2, 2).
    for method, res in runs.on_8_devices(_MESH_SCRIPT, timeout=300).items():
        assert res["gathers"] == 0, method
        assert res["err"] < 1e-5, method
