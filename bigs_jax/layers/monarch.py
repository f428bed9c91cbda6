"""Block-diagonal and Monarch matrices, and the Monarch-factored DFT.

Monarch Mixer: Fu et al., "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture",
NeurIPS 2023, https://arxiv.org/abs/2310.12109. Monarch matrices: Dao et al., "Monarch:
Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022,
https://arxiv.org/abs/2204.00595.

A Monarch matrix is a product of block-diagonal matrices and fixed "reshape-transpose"
permutations, M = P L Pᵀ R, so multiplying by it is a few batched GEMMs on reshaped blocks and
costs O(n^1.5) instead of O(n^2). M2-BERT uses a single block-diagonal factor (4 blocks) as its
MLP projections (`BlockdiagLinear`). (The two-factor form, which no model uses, lives with the
benchmark that compares it: bench/monarch_two_factor.py.) The DFT is itself a Monarch
matrix (the Cooley-Tukey four-step algorithm): `monarch_fft` computes it as two dense DFT GEMMs
of size ~√N with a twiddle multiply and transposes between them, and `fft_conv` uses it (or
`jnp.fft`) for the FFT long convolutions of the M2 sequence mixer. The DFT GEMMs run at a
`bigs_jax.layers.precision` level: 'fp32' (the default) as one complex64 einsum at HIGHEST,
'bf16_3x' and 'bf16' as four real products each. Against a float64 DFT at N = 4096
(tests/layers/test_monarch.py), relative to max |X|: fp32 2.6e-7, bf16_3x 5.0e-6, bf16
3.3e-3. Weights are stored
(block, in, out), like Flax kernels; the PyTorch checkpoints store (block, out, in).

Dimension key:
  T: flattened leading batch dims (any `...` in the public functions)
  I, O: input and output features
  K, P, Q: blocks of a block-diagonal factor, input and output size of each block (I = K·P)
  B: batch dims of a transform; N: transform length, N = U·V with U ≥ V ≈ √N
  L: sequence length of a convolution
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigs_jax.layers.linear import leading_ones
from bigs_jax.layers.precision import check_precision, complex_dot

Array = jax.Array
Dtype = Any
PrecisionLike = Any


# ----------------------------------------------------------------------------------------------
# Block-diagonal matmul
# ----------------------------------------------------------------------------------------------


def _blockdiag_einsum(x_TI: Array, w_KPQ: Array, precision: PrecisionLike) -> Array:
    K, P, Q = w_KPQ.shape
    x_TKP = x_TI.reshape(-1, K, P)
    y_TKQ = jnp.einsum("tkp,kpq->tkq", x_TKP, w_KPQ, precision=precision)
    return y_TKQ.reshape(-1, K * Q)


def _grouped_conv(x_TI: Array, w_KPQ: Array, precision: PrecisionLike) -> Array:
    # A 1x1 convolution with K feature groups is exactly x @ blockdiag(w) and reads and writes
    # the (T, features) layout directly; the einsum form lowers on XLA:CPU to a transpose into
    # block-major order, a slow batched dot and a transpose back (see bench/monarch.py).
    K, P, Q = w_KPQ.shape
    w_1PO = w_KPQ.transpose(1, 0, 2).reshape(1, P, K * Q)
    y_T1O = jax.lax.conv_general_dilated(
        x_TI[:, None, :], w_1PO, window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=K, precision=precision)
    return y_T1O[:, 0, :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _blockdiag_conv(x_TI: Array, w_KPQ: Array, precision: PrecisionLike) -> Array:
    return _grouped_conv(x_TI, w_KPQ, precision)


@_blockdiag_conv.defjvp
def _blockdiag_conv_jvp(precision, primals, tangents):
    # Reverse mode transposes this linear rule: the conv's transpose gives dx as a grouped conv,
    # the einsum's gives dw as a batched outer product, ~2x faster on CPU than JAX's transpose
    # of the conv w.r.t. its kernel (a batch-grouped conv). A JVP rule, unlike a custom VJP,
    # keeps forward mode (jvp, jacfwd, linearize) working.
    x_TI, w_KPQ = primals
    dx_TI, dw_KPQ = tangents
    y_TO = _grouped_conv(x_TI, w_KPQ, precision)
    dy_TO = _grouped_conv(dx_TI, w_KPQ, precision) + _blockdiag_einsum(x_TI, dw_KPQ, precision)
    return y_TO, dy_TO


def blockdiag_matmul(x: Array, w_KPQ: Array, *, precision: PrecisionLike = None) -> Array:
    """y = x @ blockdiag(w_0, ..., w_{K-1}), without materializing the dense matrix.

    The last axis of `x` is split into K consecutive blocks of P features; block k is multiplied
    by `w_KPQ[k]` (P in, Q out) and the K results are concatenated. This equals the M2/fly
    `blockdiag_multiply(x, weight)` with `weight = w_KPQ.transpose(0, 2, 1)`.

    Args:
      x: (..., K·P) input; any leading dims.
      w_KPQ: (K, P, Q) blocks, stored (in, out) like Flax kernels.
      precision: `jax.lax.Precision` of the matmul (None: the backend default).

    Returns:
      (..., K·Q) output in the common dtype of `x` and `w_KPQ`.
    """
    K, P, Q = w_KPQ.shape
    if x.shape[-1] != K * P:
        raise ValueError(f"blockdiag_matmul: x has {x.shape[-1]} features but the {K} blocks of "
                         f"shape {(P, Q)} need {K * P}; pad or crop x to K*P features.")
    dtype = jnp.result_type(x, w_KPQ)
    x_TI = x.reshape(-1, K * P).astype(dtype)
    w_KPQ = w_KPQ.astype(dtype)
    y_TO = jax.lax.platform_dependent(
        x_TI, w_KPQ,
        cpu=lambda a, b: _blockdiag_conv(a, b, precision),
        default=lambda a, b: _blockdiag_einsum(a, b, precision))
    return y_TO.reshape(*x.shape[:-1], K * Q)


def blockdiag_matmul_channels(x_BIL: Array, w_KPQ: Array, *,
                              precision: PrecisionLike = None) -> Array:
    """`blockdiag_matmul` on channel-major input: (B, K·P, L) → (B, K·Q, L).

    The block axis splits the channel axis, so block k is one GEMM w_kᵀ · x_k on its
    contiguous (P, L) rows, with no transpose of activations. The K GEMMs run one by one on a
    copy of the transposed blocks (`linear.matmul_channels` says why): on the 2-core AMD EPYC
    VM (jax 0.10.2) that is 1.1x (4 x 192 → 1536) and 1.8x (4 x 768 → 192) faster than one
    batched dot over the blocks at L = 8192, which XLA:CPU runs on its generic GEMM.
    """
    K, P, Q = w_KPQ.shape
    B, I, L = x_BIL.shape
    if I != K * P:
        raise ValueError(f"blockdiag_matmul_channels: x has {I} channels but the {K} blocks "
                         f"of shape {(P, Q)} need {K * P}; pad or crop x to K*P channels.")
    dtype = jnp.result_type(x_BIL, w_KPQ)
    x_BIL = x_BIL.astype(dtype)
    w_KQP = jax.lax.optimization_barrier(jnp.swapaxes(w_KPQ.astype(dtype), 1, 2))
    y_OBL = jnp.concatenate([jnp.einsum("QP,BPL->QBL", w_KQP[k], x_BIL[:, k * P:(k + 1) * P],
                                        precision=precision) for k in range(K)], axis=0)
    return jnp.moveaxis(y_OBL, 0, 1)


def blockdiag_to_dense(w_KPQ: Array) -> Array:
    """The dense (K·P, K·Q) matrix W with `blockdiag_matmul(x, w) == x @ W` (tests, benchmarks)."""
    return jax.scipy.linalg.block_diag(*w_KPQ)


# ----------------------------------------------------------------------------------------------
# Drop-in linear layers
# ----------------------------------------------------------------------------------------------


def _uniform(key: Array, shape: Sequence[int], bound: float, dtype: Dtype) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _param(value: Array, axes: Sequence[str | None]) -> nnx.Param:
    # Eager sharding off: the trainer places params (abstract init -> shardings -> jitted init),
    # and layers can be built outside any mesh (tests, notebooks).
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _fit_features(x: Array, n: int, axis: int = -1) -> Array:
    """Zero-pad or crop `axis` to n (the official StructuredLinear pre/postprocess)."""
    axis = axis % x.ndim
    if x.shape[axis] < n:
        return jnp.pad(x, [(0, n - x.shape[axis]) if a == axis else (0, 0)
                           for a in range(x.ndim)])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


class BlockdiagLinear(nnx.Module):
    """Linear layer with a block-diagonal kernel (the M2-BERT MLP projections).

    y = x @ blockdiag(kernel) + bias. When a feature count does not divide by `nblocks`, the
    input is zero-padded to nblocks·⌈in/nblocks⌉ and the output cropped, like the official
    `BlockdiagLinear`.

    Official checkpoint keys (H=768, I=3072): `mlp.gated_layers.weight (4, 1536, 192)` (no bias)
    and `mlp.wo.weight (4, 192, 768)` + `mlp.wo.bias (768,)`; each torch weight is
    (block, out, in), so `kernel = weight.transpose(0, 2, 1)`; `bias` loads as-is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        nblocks: int = 4,
        use_bias: bool = True,
        axes: tuple[str | None, str | None] = ("embed", "mlp"),
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        """Builds the layer.

        Args:
          in_features, out_features: feature counts of the input and output.
          nblocks: number of diagonal blocks K.
          use_bias: add a learned bias of shape (out_features,).
          axes: logical axis names of (input, output) features; the block axis is unsharded.
          dtype: compute dtype (None: promote input and params).
          param_dtype: dtype of the params.
          precision: `jax.lax.Precision` of the matmul.
          rngs: random streams; `rngs.params()` draws the init.
        """
        P = math.ceil(in_features / nblocks)
        Q = math.ceil(out_features / nblocks)
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.dtype, self.precision = dtype, precision
        # The official init draws a Kaiming-uniform (a=√5) dense (K·Q, K·P) matrix, scales it by
        # √(dense/blockdiag numel) = √K and keeps the diagonal blocks: U(±1/√P) per entry.
        self.kernel = _param(
            _uniform(rngs.params(), (nblocks, P, Q), 1 / math.sqrt(P), param_dtype),
            (None, axes[0], axes[1]))
        # The official bias bound uses fan_in = bias length = out_features (StructuredLinear).
        self.bias = (_param(_uniform(rngs.params(), (out_features,),
                                     1 / math.sqrt(out_features), param_dtype), (axes[1],))
                     if use_bias else None)

    def __call__(self, x: Array) -> Array:
        """Applies the layer to x of shape (..., in_features); returns (..., out_features)."""
        K, P, _ = self.kernel.shape
        kernel = self.kernel[...]
        dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
        y = blockdiag_matmul(_fit_features(x, K * P).astype(dtype), kernel.astype(dtype),
                             precision=self.precision)
        y = _fit_features(y, self.out_features)
        if self.bias is not None:
            y = y + leading_ones(self.bias[...].astype(dtype), y.ndim)
        return y

    def channel_major(self, x_BIL: Array) -> Array:
        """The layer on channel-major x (B, in_features, L); returns (B, out_features, L)."""
        K, P, _ = self.kernel.shape
        kernel = self.kernel[...]
        dtype = jnp.result_type(x_BIL, kernel) if self.dtype is None else self.dtype
        y_BOL = blockdiag_matmul_channels(_fit_features(x_BIL, K * P, axis=1).astype(dtype),
                                          kernel.astype(dtype), precision=self.precision)
        y_BOL = _fit_features(y_BOL, self.out_features, axis=1)
        if self.bias is not None:
            y_BOL = y_BOL + self.bias[...].astype(dtype)[None, :, None]
        return y_BOL


# ----------------------------------------------------------------------------------------------
# Monarch-factored DFT
# ----------------------------------------------------------------------------------------------


def dft_factors(n: int) -> tuple[int, int]:
    """(U, V) with U·V = n and U the smallest divisor of n with U² ≥ n (256×256 for 65536,
    64×32 for 2048, n×1 for a prime)."""
    u = next(d for d in range(math.isqrt(n - 1) + 1, n + 1) if n % d == 0)  # ⌈√n⌉ first
    return u, n // u


@functools.lru_cache(maxsize=64)
def _dft_plan(n: int, inverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """complex64 F_V, twiddles ω_N^(n1·k2) and F_U (with 1/N if inverse) for length n."""
    u, v = dft_factors(n)
    sign = 1.0 if inverse else -1.0

    def phase(j: np.ndarray, k: np.ndarray, m: int) -> np.ndarray:
        # Reduce j·k mod m in integers, then take the angle in float64: exact to ~1e-16 before
        # the cast, where accumulating phases in float32 would drift by ~N·1e-7.
        return np.exp(sign * 2j * np.pi * (np.outer(j, k) % m) / m)

    f_VV = phase(np.arange(v), np.arange(v), v)
    tw_UV = phase(np.arange(u), np.arange(v), n)
    f_UU = phase(np.arange(u), np.arange(u), u) / (n if inverse else 1)
    return tuple(a.astype(np.complex64) for a in (f_VV, tw_UV, f_UU))


def _dft_last(x: Array, inverse: bool, precision: str = "fp32") -> Array:
    """complex64 DFT (or inverse DFT with 1/N) along the last axis; GEMMs at `precision`.

    Four-step with n = n1 + U·n2 and k = V·k1 + k2:
      X[k1, k2] = Σ_n1 F_U[k1, n1] · ω_N^(n1·k2) · Σ_n2 x[n2, n1] F_V[n2, k2].
    As a Monarch matrix: permutation, block-diagonal (U copies of F_V), diagonal twiddle,
    block-diagonal (V copies of F_U), permutation; the einsums carry the permutations.
    """
    x = x.astype(jnp.complex64)
    *lead, N = x.shape
    U, V = dft_factors(N)
    f_VV, tw_UV, f_UU = _dft_plan(N, inverse)
    x_BVU = x.reshape(*lead, V, U)
    y_BUV = complex_dot("...vu,vw->...uw", x_BVU, f_VV, precision)
    y_BUV = y_BUV * leading_ones(tw_UV, y_BUV.ndim)
    z_BUV = complex_dot("ku,...uw->...kw", f_UU, y_BUV, precision)
    return z_BUV.reshape(*lead, N)


def _fit_length(x: Array, n: int) -> Array:
    """Crop or zero-pad the last axis to n (numpy's `n=` semantics)."""
    if x.shape[-1] >= n:
        return x[..., :n]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _on_last_axis(x: Array, axis: int, fn: Callable[[Array], Array]) -> Array:
    x = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(fn(x), -1, axis)


def _complex_transform(x: Array, n: int | None, axis: int, inverse: bool,
                       precision: str) -> Array:
    check_precision(precision, "DFT precision")

    def last(x: Array) -> Array:
        return _dft_last(_fit_length(x, n or x.shape[-1]), inverse, precision)
    return _on_last_axis(jnp.asarray(x), axis, last)


def monarch_fft(x: Array, n: int | None = None, axis: int = -1, *,
                precision: str = "fp32") -> Array:
    """DFT along `axis` as two dense DFT GEMMs of size ~√N (same contract as `jnp.fft.fft`).

    Args:
      x: real or complex input; computed in float32/complex64.
      n: transform length; the axis is cropped or zero-padded to it (default: its size).
      axis: the transformed axis.
      precision: the GEMMs' level, one of `precision.PRECISIONS` ('fp32': HIGHEST).

    Returns:
      complex64 array, X[k] = Σ_n x[n] exp(-2πi·nk/N).
    """
    return _complex_transform(x, n, axis, False, precision)


def monarch_ifft(x: Array, n: int | None = None, axis: int = -1, *,
                 precision: str = "fp32") -> Array:
    """Inverse DFT (with 1/N) along `axis`; same contract as `jnp.fft.ifft`."""
    return _complex_transform(x, n, axis, True, precision)


def _half_twiddle(n: int, inverse: bool) -> np.ndarray:
    k = np.arange(n // 2 + 1)
    return np.exp((1 if inverse else -1) * 2j * np.pi * k / n).astype(np.complex64)


def monarch_rfft(x: Array, n: int | None = None, axis: int = -1, *,
                 precision: str = "fp32") -> Array:
    """DFT of a real signal, bins 0..n//2 (same contract as `jnp.fft.rfft`), GEMMs at
    `precision`.

    For even n the signal is packed as z[m] = x[2m] + i·x[2m+1] and transformed with one complex
    DFT of length n/2, then split into the even/odd spectra: half the GEMM work of `monarch_fft`.
    """
    check_precision(precision, "DFT precision")

    def last(x: Array) -> Array:
        x = _fit_length(x.astype(jnp.float32), n or x.shape[-1])
        N = x.shape[-1]
        if N % 2:
            return _dft_last(x, False, precision)[..., : N // 2 + 1]
        z = _dft_last(jax.lax.complex(x[..., 0::2], x[..., 1::2]), False, precision)
        z = jnp.concatenate([z, z[..., :1]], axis=-1)  # Z[n/2] = Z[0]
        zc_rev = jnp.conj(z[..., ::-1])  # conj(Z[n/2 - k])
        even, odd = 0.5 * (z + zc_rev), -0.5j * (z - zc_rev)
        return even + leading_ones(_half_twiddle(N, inverse=False), odd.ndim) * odd
    return _on_last_axis(jnp.asarray(x), axis, last)


def monarch_irfft(x: Array, n: int | None = None, axis: int = -1, *,
                  precision: str = "fp32") -> Array:
    """Inverse of `monarch_rfft` (same contract as `jnp.fft.irfft`), GEMMs at `precision`.

    Like numpy, the imaginary parts of bin 0 (and of bin n/2 for even n) are ignored.
    """
    check_precision(precision, "DFT precision")

    def last(x: Array) -> Array:
        N = n or 2 * (x.shape[-1] - 1)
        x = _fit_length(x.astype(jnp.complex64), N // 2 + 1)
        x = x.at[..., 0].set(x[..., 0].real)
        if N % 2:
            full = jnp.concatenate([x, jnp.conj(x[..., 1:][..., ::-1])], axis=-1)
            return _dft_last(full, True, precision).real
        x = x.at[..., -1].set(x[..., -1].real)
        xc_rev = jnp.conj(x[..., ::-1])  # conj(X[n/2 - k])
        even = 0.5 * (x + xc_rev)
        odd = 0.5 * (x - xc_rev) * leading_ones(_half_twiddle(N, inverse=True), x.ndim)
        zf = (even + 1j * odd)[..., : N // 2]
        z = _dft_last(zf, True, precision)
        return jnp.stack([z.real, z.imag], axis=-1).reshape(*z.shape[:-1], N)
    return _on_last_axis(jnp.asarray(x), axis, last)


def fft_conv(u: Array, k: Array, n_fft: int, use_monarch: bool = False,
             precision: str = "fp32") -> Array:
    """Causal convolution of `u` with `k` along the last axis by an FFT of length n_fft.

    Computes y[..., t] = Σ_{s<L} k[..., (t - s) mod n_fft] · u[..., s] for t < L, with k
    zero-padded to n_fft: the circular convolution of the zero-padded signals, first L outputs.
    With n_fft ≥ L + Lk - 1 (e.g. n_fft = 2L for Lk = L) nothing wraps and this is the causal
    linear convolution y[t] = Σ_{s≤t} k[t-s] u[s]. The M2 bidirectional conv relies on the wrap
    on purpose: a length-2L kernel [k_fwd, 0] + [0, flip(k_rev)] with n_fft = 2L. The reference
    `rfft(k)/n · irfft(·, norm="forward")` is the same computation as here.

    Args:
      u: (..., L) real signal.
      k: (..., Lk) real kernel, Lk ≤ n_fft; leading dims broadcast against u's.
      n_fft: FFT length, ≥ L and ≥ Lk.
      use_monarch: use the Monarch (GEMM) DFT instead of `jnp.fft`.
      precision: the Monarch DFT GEMMs' level, one of `precision.PRECISIONS`; `jnp.fft`
        (use_monarch=False) always runs in float32 and ignores it.

    Returns:
      (..., L) float32, leading dims broadcast from u and k.
    """
    L, Lk = u.shape[-1], k.shape[-1]
    if n_fft < L or n_fft < Lk:
        raise ValueError(f"fft_conv: n_fft={n_fft} is shorter than the signal (L={L}) or the "
                         f"kernel (Lk={Lk}); use n_fft >= L + Lk - 1 for a linear convolution.")
    check_precision(precision, "long-conv precision")
    if use_monarch:
        rfft = functools.partial(monarch_rfft, precision=precision)
        irfft = functools.partial(monarch_irfft, precision=precision)
    else:
        rfft, irfft = jnp.fft.rfft, jnp.fft.irfft
    u_f = rfft(u.astype(jnp.float32), n=n_fft)
    k_f = rfft(k.astype(jnp.float32), n=n_fft)
    rank = max(u_f.ndim, k_f.ndim)
    return irfft(leading_ones(u_f, rank) * leading_ones(k_f, rank), n=n_fft)[..., :L]
