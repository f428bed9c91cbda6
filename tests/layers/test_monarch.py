"""Block-diagonal / Monarch matmuls vs dense matrices, Monarch DFT vs jnp.fft, FFT convolution
vs a direct float64 convolution, and the drop-in linear layers."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers import monarch
from bigs_jax.layers.linear import matmul_channels
from bigs_jax.layers.precision import PRECISIONS
from bench.monarch_two_factor import MonarchLinear, monarch_matmul, monarch_to_dense
from bigs_jax.layers.monarch import (
    BlockdiagLinear,
    blockdiag_matmul,
    blockdiag_to_dense,
    fft_conv,
    monarch_fft,
    monarch_ifft,
    monarch_irfft,
    monarch_rfft,
)

MATMUL_TOL = 1e-5
FFT_TOL = 1e-4


def rel_err(got, ref):
    """max |got - ref| / max |ref|."""
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def normal(seed, shape, complex_=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if complex_:
        x = x + 1j * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.complex64)
    return jnp.asarray(x, jnp.float32)


def grads(f, *args, seed=99):
    """Gradients w.r.t. every arg of <f(*args), c> for a fixed random cotangent c."""
    out = jax.eval_shape(f, *args)
    c = normal(seed, out.shape, jnp.issubdtype(out.dtype, jnp.complexfloating))
    # c is an argument, not a closed-over constant: XLA would constant-fold the whole backward
    # pass through the DFT matrices in its (slow) HLO evaluator.
    def loss(c, *a):
        return jnp.sum(jnp.real(f(*a) * c))

    return jax.jit(jax.grad(loss, argnums=tuple(range(1, len(args) + 1))))(c, *args)


# ----------------------------------------------------------------------------------------------
# Block-diagonal and Monarch matmuls
# ----------------------------------------------------------------------------------------------

BLOCKDIAG_CASES = [  # (K, P, Q, leading dims)
    (1, 24, 40, (5,)),
    (2, 12, 7, (3, 4)),
    (4, 16, 48, (2, 3, 2)),
    (4, 48, 12, (6,)),
    (16, 4, 3, ()),
]


@pytest.mark.parametrize("K,P,Q,lead,impl", [
    case + (impl,) for case in BLOCKDIAG_CASES for impl in ("public", "einsum")
    if impl == "public" or case[0] in (1, 4)])
def test_blockdiag_matches_dense(K, P, Q, lead, impl):
    # "public" runs the CPU grouped-conv path with its custom JVP; "einsum" the accelerator path.
    fn = (blockdiag_matmul if impl == "public"
          else lambda x, w: monarch._blockdiag_einsum(x.reshape(-1, K * P), w, None)
          .reshape(*x.shape[:-1], K * Q))
    x = normal(0, lead + (K * P,))
    w_KPQ = normal(1, (K, P, Q))
    w_IO = blockdiag_to_dense(w_KPQ)
    assert w_IO.shape == (K * P, K * Q)
    ref = np.asarray(x, np.float64) @ np.asarray(w_IO, np.float64)
    err = rel_err(jax.jit(fn)(x, w_KPQ), ref)
    assert err < MATMUL_TOL, err

    got_dx, got_dw = grads(fn, x, w_KPQ)
    ref_dx, ref_dw = grads(lambda x, w: x @ blockdiag_to_dense(w), x, w_KPQ)
    assert rel_err(got_dx, ref_dx) < MATMUL_TOL
    assert rel_err(got_dw, ref_dw) < MATMUL_TOL


def test_blockdiag_forward_mode():
    # The CPU path has a custom JVP rule; jvp must agree with the dense path too.
    x, w_KPQ = normal(0, (6, 32)), normal(1, (4, 8, 5))
    dx, dw = normal(2, x.shape), normal(3, w_KPQ.shape)
    _, got = jax.jvp(blockdiag_matmul, (x, w_KPQ), (dx, dw))
    _, want = jax.jvp(lambda x, w: x @ blockdiag_to_dense(w), (x, w_KPQ), (dx, dw))
    assert rel_err(got, want) < MATMUL_TOL


def test_blockdiag_matches_official_einsum():
    # M2's blockdiag_multiply with its torch (block, out, in) weight: '...kp,kqp->...kq'.
    x = normal(0, (3, 64))
    weight_KQP = normal(1, (4, 24, 16))
    ref = np.einsum("bkp,kqp->bkq", np.asarray(x, np.float64).reshape(3, 4, 16),
                    np.asarray(weight_KQP, np.float64)).reshape(3, 96)
    assert rel_err(blockdiag_matmul(x, weight_KQP.transpose(0, 2, 1)), ref) < MATMUL_TOL


MONARCH_CASES = [  # (K, P, Q), (J, R, S), leading dims
    ((4, 4, 4), (4, 4, 4), (3,)),          # square Monarch, n = 16, b = 4
    ((16, 2, 2), (16, 2, 2), (2, 2)),      # n = 32, 16 blocks
    ((2, 8, 6), (4, 3, 5), ()),            # rectangular: 16 -> 12 -> 20
    ((4, 8, 8), (4, 8, 16), (5,)),         # fly MonarchLinear in < out (32 -> 64)
    ((4, 16, 8), (4, 8, 8), (2, 3)),       # fly MonarchLinear in > out (64 -> 32)
    ((1, 6, 10), (2, 5, 3), (4,)),         # one block first
]


@pytest.mark.parametrize("r_shape,l_shape,lead", MONARCH_CASES)
def test_monarch_matches_dense(r_shape, l_shape, lead):
    x = normal(0, lead + (r_shape[0] * r_shape[1],))
    r_KPQ, l_JRS = normal(1, r_shape), normal(2, l_shape)
    w_IO = monarch_to_dense(r_KPQ, l_JRS)
    ref = np.asarray(x, np.float64) @ np.asarray(w_IO, np.float64)
    err = rel_err(jax.jit(monarch_matmul)(x, r_KPQ, l_JRS), ref)
    assert err < MATMUL_TOL, err

    got = grads(monarch_matmul, x, r_KPQ, l_JRS)
    want = grads(lambda x, r, l_: x @ monarch_to_dense(r, l_), x, r_KPQ, l_JRS)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < MATMUL_TOL


def test_monarch_is_P_L_Pt_R():
    # Column-vector convention of the papers: M = P L Pᵀ R with torch-oriented (out, in) blocks
    # and P the reshape-(b, b)-transpose permutation; our row-vector kernel is Mᵀ.
    b = 4
    r_KPQ, l_JRS = normal(1, (b, b, b)), normal(2, (b, b, b))
    P = np.eye(b * b)[np.arange(b * b).reshape(b, b).T.reshape(-1)]
    v = np.arange(b * b, dtype=np.float64)
    np.testing.assert_array_equal(P @ v, v.reshape(b, b).T.reshape(-1))
    R = np.asarray(blockdiag_to_dense(r_KPQ.transpose(0, 2, 1)), np.float64)
    L = np.asarray(blockdiag_to_dense(l_JRS.transpose(0, 2, 1)), np.float64)
    M = P @ L @ P.T @ R
    assert rel_err(monarch_to_dense(r_KPQ, l_JRS), M.T) < MATMUL_TOL
    x = normal(0, (3, b * b))
    assert rel_err(monarch_matmul(x, r_KPQ, l_JRS), np.asarray(x, np.float64) @ M.T) < MATMUL_TOL


def test_monarch_matches_official_butterfly_einsum():
    # fly/M2 blockdiag_butterfly_multiply, einsum reference, torch layouts w1 (k, q, p),
    # w2 (j, s, r) (the notes' l blocks), rectangular: 12 -> 18 -> 10.
    k, q, p, j, s, r = 3, 6, 4, 2, 5, 9
    x = normal(0, (6, k * p))
    w1, w2 = normal(1, (k, q, p)), normal(2, (j, s, r))
    x64, w1_64, w2_64 = (np.asarray(a, np.float64) for a in (x, w1, w2))
    o1 = np.einsum("kqp,bkp->bkq", w1_64, x64.reshape(6, k, p)).reshape(6, r, j)
    o1 = o1.transpose(0, 2, 1)  # 'b (r l) -> b l r'
    ref = np.einsum("jsr,bjr->bsj", w2_64, o1).reshape(6, s * j)
    got = monarch_matmul(x, w1.transpose(0, 2, 1), w2.transpose(0, 2, 1))
    assert rel_err(got, ref) < MATMUL_TOL


def test_matmul_shape_errors():
    with pytest.raises(ValueError, match="need 8"):
        blockdiag_matmul(jnp.ones((2, 9)), jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="must be equal"):
        monarch_matmul(jnp.ones((2, 8)), jnp.ones((2, 4, 3)), jnp.ones((2, 4, 3)))


# ----------------------------------------------------------------------------------------------
# Monarch DFT
# ----------------------------------------------------------------------------------------------

FFT_SIZES = [16, 256, 4096, 65536]


def _batch(n):
    return (2,) if n >= 4096 else (3, 2)


@pytest.mark.parametrize("n", FFT_SIZES)
def test_monarch_fft_matches_jnp(n):
    xc = normal(n, _batch(n) + (n,), complex_=True)
    xr = normal(n + 1, _batch(n) + (n,))
    pairs = [
        (monarch_fft, jnp.fft.fft, xc),
        (monarch_fft, jnp.fft.fft, xr),
        (monarch_ifft, jnp.fft.ifft, xc),
        (monarch_ifft, jnp.fft.ifft, xr),
        (monarch_rfft, jnp.fft.rfft, xr),
        (monarch_irfft, jnp.fft.irfft, jnp.fft.rfft(xr)),
        (monarch_irfft, jnp.fft.irfft, xc[..., : n // 2 + 1]),  # non-Hermitian DC/Nyquist
    ]
    for ours, theirs, x in pairs:
        name = f"{ours.__name__} {x.dtype}"
        err = rel_err(jax.jit(ours)(x), theirs(x))
        assert err < FFT_TOL, (name, err)
        (g_ours,), (g_theirs,) = grads(ours, x), grads(theirs, x)
        err = rel_err(g_ours, g_theirs)
        assert err < FFT_TOL, (name, "grad", err)


@pytest.mark.parametrize("n", [24, 97])
def test_monarch_fft_other_lengths(n):
    x = normal(n, (2, n, 3), complex_=True)  # transform along axis 1
    assert rel_err(monarch_fft(x, axis=1), jnp.fft.fft(x, axis=1)) < FFT_TOL
    assert rel_err(monarch_ifft(x, axis=1), jnp.fft.ifft(x, axis=1)) < FFT_TOL
    xr = x.real
    assert rel_err(monarch_rfft(xr, n=2 * n, axis=1), jnp.fft.rfft(xr, n=2 * n, axis=1)) < FFT_TOL
    X = jnp.fft.rfft(xr, axis=1)
    assert rel_err(monarch_irfft(X, n=n, axis=1), xr) < FFT_TOL


def test_monarch_fft_precisions():
    """The DFT GEMMs at each `precision.PRECISIONS` level against a float64 DFT, N = 4096 (64 x
    64): fp32 and bf16_3x (four real products of three bf16 products each) within 1e-5,
    measured 2.6e-7 and 5.0e-6 of max |X|; one bf16 product (3.3e-3) is 10x worse or more; a
    wrong level is refused."""
    x = normal(5, (3, 4096), complex_=True)
    ref = np.fft.fft(np.asarray(x, np.complex128))
    errs = {p: rel_err(jax.jit(functools.partial(monarch_fft, precision=p))(x), ref)
            for p in PRECISIONS}
    assert errs["fp32"] < 1e-5 and errs["bf16_3x"] < 1e-5, errs
    assert 10 * errs["bf16_3x"] < errs["bf16"] < 1e-2, errs
    with pytest.raises(ValueError, match="DFT precision 'highest'"):
        monarch_rfft(x.real, precision="highest")


def test_dft_factors():
    assert monarch.dft_factors(65536) == (256, 256)
    assert monarch.dft_factors(2048) == (64, 32)
    assert monarch.dft_factors(16) == (4, 4)
    assert monarch.dft_factors(97) == (97, 1)


# ----------------------------------------------------------------------------------------------
# FFT convolution
# ----------------------------------------------------------------------------------------------


def direct_causal_conv(u, k):
    """y[..., t] = sum_{s<=t} k[..., t-s] u[..., s] in float64 numpy, leading dims broadcast."""
    u, k = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(k, np.float64))
    L = u.shape[-1]
    lag = np.arange(L)[:, None] - np.arange(L)[None, :]
    T = np.where(lag >= 0, k[..., np.clip(lag, 0, None)], 0.0)  # (..., t, s)
    return np.einsum("...ts,...s->...t", T, u)


@pytest.mark.parametrize("L", [100, 1024])
def test_fft_conv_matches_direct(L):
    u = normal(1, (2, 3, L))
    k = normal(2, (3, L)) * jnp.exp(-jnp.arange(L) / L)[None]
    ref = direct_causal_conv(u, k)
    y_jnp = fft_conv(u, k, 2 * L, use_monarch=False)
    y_m2 = jax.jit(fft_conv, static_argnums=(2, 3))(u, k, 2 * L, True)
    assert y_m2.shape == (2, 3, L) and y_m2.dtype == jnp.float32
    assert rel_err(y_jnp, ref) < FFT_TOL
    assert rel_err(y_m2, ref) < FFT_TOL
    assert rel_err(y_m2, y_jnp) < FFT_TOL
    g_m2 = grads(lambda u, k: fft_conv(u, k, 2 * L, True), u, k)
    g_jnp = grads(lambda u, k: fft_conv(u, k, 2 * L, False), u, k)
    for a, b in zip(g_m2, g_jnp, strict=True):
        assert rel_err(a, b) < FFT_TOL


def test_fft_conv_m2_bidirectional_wrap():
    # M2's bidirectional kernel [k_fwd, 0] + [0, flip(k_rev)] with n_fft = 2L:
    # y[t] = sum_{s<=t} k_fwd[t-s] u[s] + sum_{s>t} k_rev[s-t-1] u[s].
    L = 64
    u, k_fwd, k_rev = normal(1, (4, L)), normal(2, (4, L)), normal(3, (4, L))
    k2 = jnp.concatenate([k_fwd, jnp.zeros_like(k_fwd)], -1) + jnp.concatenate(
        [jnp.zeros_like(k_rev), k_rev[:, ::-1]], -1)
    lag = np.arange(L)[None, :] - np.arange(L)[:, None] - 1  # s - t - 1, indexed [t, s]
    T_rev = np.where(lag >= 0, np.asarray(k_rev, np.float64)[:, np.clip(lag, 0, None)], 0.0)
    anti = np.einsum("hts,hs->ht", T_rev, np.asarray(u, np.float64))
    ref = direct_causal_conv(u, k_fwd) + anti
    for use_monarch in (False, True):
        assert rel_err(fft_conv(u, k2, 2 * L, use_monarch), ref) < FFT_TOL


def test_fft_conv_rejects_short_fft():
    with pytest.raises(ValueError, match="n_fft=8"):
        fft_conv(jnp.ones((16,)), jnp.ones((16,)), 8)


# ----------------------------------------------------------------------------------------------
# Linear layers
# ----------------------------------------------------------------------------------------------


def test_blockdiag_linear_one_block_is_dense_linear():
    x = normal(0, (2, 5, 24))
    dense = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
    layer = BlockdiagLinear(24, 40, nblocks=1, rngs=nnx.Rngs(1))
    layer.kernel[...] = dense.kernel[...][None]
    layer.bias[...] = dense.bias[...]
    assert rel_err(layer(x), dense(x)) < MATMUL_TOL


def test_blockdiag_linear_params_and_init():
    layer = BlockdiagLinear(768, 3072, nblocks=4, rngs=nnx.Rngs(0))
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert n_params == 768 * 3072 // 4 + 3072
    assert layer.kernel.shape == (4, 192, 768)  # torch would store (4, 768, 192): (block, out, in)
    kernel = np.asarray(layer.kernel[...])
    bound = 1 / math.sqrt(192)
    assert np.abs(kernel).max() <= bound
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.01 * bound
    assert layer.kernel.get_metadata()["out_sharding"] == (None, "embed", "mlp")
    no_bias = BlockdiagLinear(768, 6144, nblocks=4, use_bias=False, rngs=nnx.Rngs(0))
    assert no_bias.bias is None and no_bias.kernel.shape == (4, 192, 1536)


def test_blockdiag_linear_pads_and_crops():
    # 10 -> 7 with 4 blocks: kernel (4, 3, 2), input padded to 12, output cropped from 8.
    layer = BlockdiagLinear(10, 7, nblocks=4, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (4, 3, 2)
    x = normal(0, (3, 10))
    x_pad = np.pad(np.asarray(x, np.float64), [(0, 0), (0, 2)])
    ref = (x_pad @ np.asarray(blockdiag_to_dense(layer.kernel[...]), np.float64))[:, :7]
    assert rel_err(layer(x), ref + np.asarray(layer.bias[...])) < MATMUL_TOL


@pytest.mark.parametrize("d_in,d_out,shapes", [
    (32, 64, ((4, 8, 8), (4, 8, 16))),
    (64, 32, ((4, 16, 8), (4, 8, 8))),
])
def test_monarch_linear(d_in, d_out, shapes):
    layer = MonarchLinear(d_in, d_out, nblocks=4, rngs=nnx.Rngs(0))
    assert (layer.kernel1.shape, layer.kernel2.shape) == shapes
    x = normal(0, (2, 3, d_in))
    w = np.asarray(monarch_to_dense(layer.kernel1[...], layer.kernel2[...]), np.float64)
    ref = np.asarray(x, np.float64) @ w + np.asarray(layer.bias[...])
    assert rel_err(jax.jit(lambda x: layer(x))(x), ref) < MATMUL_TOL
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert n_params == math.prod(shapes[0]) + math.prod(shapes[1]) + d_out


@pytest.mark.parametrize("d_in,d_out,nblocks", [(24, 40, 4), (10, 7, 4), (768, 6144, 4)])
def test_blockdiag_channel_major_equals_last_axis_layout(d_in, d_out, nblocks):
    # channel_major on (B, in, L) is the layer on (B, L, in), transposed; padding included
    layer = BlockdiagLinear(d_in, d_out, nblocks=nblocks, rngs=nnx.Rngs(0))
    x_BLI = normal(1, (2, 9, d_in))
    got_BOL = jax.jit(lambda x: layer.channel_major(x))(jnp.swapaxes(x_BLI, 1, 2))
    assert got_BOL.shape == (2, d_out, 9)
    assert rel_err(jnp.swapaxes(got_BOL, 1, 2), layer(x_BLI)) < MATMUL_TOL


def _dot_forms(fn, *args) -> set:
    """(lhs, rhs) contracting dims of every dot in fn's compiled program."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return set(re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}",
                          text))


def test_channel_major_gemms_are_exact_and_compile_to_plain_gemms():
    # matmul_channels (B, I, L) x (I, O) -> (B, O, L): values and both gradients against float64
    x_BIL, w_IO, g_BOL = normal(0, (3, 12, 6)), normal(1, (12, 5)), normal(2, (3, 5, 6))
    y, vjp = jax.vjp(lambda x, w: matmul_channels(x, w, precision="highest"), x_BIL, w_IO)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x_BIL, w_IO, g_BOL))
    assert rel_err(y, np.einsum("bil,io->bol", x64, w64)) < MATMUL_TOL
    dx, dw = vjp(g_BOL)
    assert rel_err(dx, np.einsum("bol,io->bil", g64, w64)) < MATMUL_TOL
    assert rel_err(dw, np.einsum("bil,bol->io", x64, g64)) < MATMUL_TOL
    # The reason the helpers exist: XLA:CPU's fast GEMM takes only dots whose lhs contracts
    # its last axis and rhs its first. The plain einsum compiles to a transposed-lhs dot
    # (the control: this test fails if the helpers fall back to it).
    x1, w = normal(3, (1, 64, 256)), normal(4, (64, 96))
    assert _dot_forms(lambda x, w: jnp.einsum("BIL,IO->BOL", x, w), x1, w) == {("0", "0")}
    assert _dot_forms(matmul_channels, x1, w) == {("1", "0")}
    assert _dot_forms(monarch.blockdiag_matmul_channels, x1, normal(5, (4, 16, 24))) == {("1", "0")}


def test_blockdiag_matmul_channels_matches_dense_and_refuses_bad_width():
    w = normal(0, (3, 4, 5))
    x_BIL = normal(1, (2, 12, 6))
    ref = np.einsum("bil,io->bol", np.asarray(x_BIL, np.float64),
                    np.asarray(blockdiag_to_dense(w), np.float64))
    assert rel_err(monarch.blockdiag_matmul_channels(x_BIL, w), ref) < MATMUL_TOL
    with pytest.raises(ValueError, match="need 12"):
        monarch.blockdiag_matmul_channels(normal(1, (2, 10, 6)), w)
