"""Diagonal state space layer (S4D) as the official BiGS code uses it.

BiGS: Wang, Yan, Gu, Rush, "Pretraining Without Attention", arXiv 2212.10544.
S4D: Gu, Gupta, Goel, Re, "On the Parameterization and Initialization of Diagonal State Space
Models", arXiv 2206.11893.

Each channel of the input is filtered by a linear time-invariant system with diagonal complex
state matrix A (N modes), B fixed to 1, output projection C and skip D, discretized by
zero-order hold with one step size Delta. Unrolled, the system is a causal convolution with the
kernel K[l] = Re sum_n C_n (exp(Delta A_n) - 1) / A_n exp(l Delta A_n); all N modes are kept
(no conjugate halving, no factor 2), exactly as the official BiGS `s4d_kernel_zoh`. In the
official model one SSM is shared by every channel (`shared=True`, param shapes `A_re (N,)`,
`A_im (N,)`, `C (N, 2)`, `D (1,)`, `log_step (1,)`); `shared=False` gives one SSM per channel as
in S4D and annotated-s4. The convolution is applied by FFT, by chunked matmuls (below), by a
chunked scan of the recurrence, by a sequential scan, or by a dense Toeplitz matmul
(reference); `step` runs the recurrence one token at a time with O(N) state per channel.
`reverse_padded` gives the backward direction of a bidirectional mixer without letting pads
leak into real tokens; `anticausal=True` computes that direction without reversing at all.

The chunked (matmul) path splits L into chunks of C tokens: within a chunk the convolution is
a C x C Toeplitz matmul; across chunks it goes through the SSM state, exactly: the state at each
chunk end is a (2N x C) matmul of the chunk (Re, Im of A_bar^(C-1-i)), the states are carried
chunk to chunk by A_bar^C (a scan over L/C steps), and each chunk reads the carried state with
a (C x 2N) matmul (C B_bar A_bar^(j+1)). Cost 2 (C + 4N) flops per token and channel, all in
matmuls, no FFT: the path for matmul units (TPU, GPU). `precision` picks how those matmuls run
(`bigs_jax.layers.precision`, shared with M2's matmul long convolutions): 'fp32' (HIGHEST),
'bf16_3x' (each f32 operand split into bf16 hi + lo, three bf16 products with f32
accumulation) or 'bf16' (one bf16 product). Against the fp32 FFT path at L = 1000, N = 64
(tests/layers/test_ssm.py), relative to max |y|: fp32 2e-7 to 5e-7, bf16_3x 5.5e-6 to 7.5e-6,
bf16 2.8e-3 to 3.7e-3; the backward matmuls run at the same level (bf16_3x gradients within
6.2e-6 of the FFT path's, where plain autodiff gave bf16-accurate 3e-3).
`resolve_mode('auto')` is the per-backend default: 'fft' on CPU, 'chunked' elsewhere. On CPU the
chunked path costs more than XLA's FFT inside the BiGS encoder (1024 flops per token and
channel at C = 256, N = 64, against ~1-2% of the layer for the FFT; bench/bigs_encoder.py
--modes chunked shows it), while TPU FFTs are slow and memory-bound.

Dimension key: B batch, L length, D channels (model dim), N state size, H number of distinct
SSMs (1 when shared, D otherwise), F = L + 1 rfft bins of the 2L-padded sequence; chunked path:
M chunks of C tokens, R = C + 2N rows (Toeplitz rows, then Re and Im of the chunk-end state),
K = 2N real state rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigs_jax.layers.linear import sharded
from bigs_jax.layers.precision import PRECISIONS, dot

Dtype = Any

INITS = ("legs", "lin", "inv")
MODES = ("fft", "chunked", "scan", "recurrent", "toeplitz")
CHUNK = 256  # chunked path: the fastest of 64/128/256 on CPU at L = 512 and 8192
_A_RE_MAX = -1e-4  # the official clip that keeps every mode stable (Re A < 0)


def hippo_legs(N: int) -> np.ndarray:
    """The (N, N) HiPPO-LegS state matrix A, float64.

    A_nk = -sqrt((2n+1)(2k+1)) below the diagonal, -(n+1) on it, 0 above.
    """
    r = np.sqrt(2.0 * np.arange(N) + 1.0)
    return -(np.tril(np.outer(r, r), -1) + np.diag(np.arange(N) + 1.0))


def ssm_init(kind: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Initial (A_re, A_im), each (N,) float64, for the S4D init `kind`.

    Args:
      kind: 'legs' (official BiGS default "hippo"): eigenvalues of the normal part of HiPPO-LegS;
        'lin': A = -1/2 + i pi n; 'inv': A = -1/2 + i (N/pi)(N/(2n+1) - 1); n = 0..N-1.
      N: state size. All N modes are returned (LegS: the N/2 conjugate pairs both appear).

    Returns:
      A_re and A_im as float64 numpy arrays.
    """
    n = np.arange(N, dtype=np.float64)
    a_re = np.full((N,), -0.5)
    if kind == "legs":
        # HiPPO-LegS is normal plus low rank: S = A + P P^T with P_n = sqrt(n + 1/2) is -1/2 I
        # plus a real skew-symmetric matrix. Its eigenvalues are therefore -1/2 + i w, with w the
        # (real) eigenvalues of the Hermitian matrix -i (S + I/2); eigh returns them ascending,
        # the order of the official `make_DPLR_HiPPO`.
        P = np.sqrt(n + 0.5)
        S = hippo_legs(N) + np.outer(P, P)
        # (The official code stores mean(diag S), i.e. -1/2 up to a float64 ulp: -0.5 in f32.)
        a_im = np.linalg.eigvalsh(-1j * (S - np.diag(np.diag(S))))
    elif kind == "lin":
        a_im = np.pi * n
    elif kind == "inv":
        a_im = (N / np.pi) * (N / (2 * n + 1) - 1)
    else:
        raise ValueError(f"unknown S4D init {kind!r}; choose one of {list(INITS)}")
    return a_re, a_im


# ---- float32 phase accuracy -------------------------------------------------------------------
# K[l] needs exp(i l Delta A_im), whose phase reaches 1e4-1e5 rad over a few thousand steps.
# Plain float32 gets it wrong by 1e-3 rad and more: the phase is l times Delta*A_im, so any
# relative error of Delta*A_im (rounding of exp(log_step), of the product, of l*(...)) grows
# with l. Measured against a float64 evaluation on the same float32 params, the plain formula
# reaches ~1e-5 of max|K| at Delta = 0.01 (slow decay keeps large-l terms alive), mostly from
# the rounding of exp(log_step) alone. So, in float32 only:
#   1. Delta = exp(log_step) is computed as an unevaluated sum hi + lo (<1e-9 relative) by
#      Cody-Waite reduction by ln 2, a 179-entry table of exp(i/256) and a 3-term series;
#   2. Delta*A_im/(2 pi), the phase per step in turns, is formed exactly as t + t_lo with
#      Dekker's two-product (splits by bit masks, so FMA contraction cannot break it);
#   3. for l < 2^k, t's top 24-k bits times l are exact, so their fractional part (mod one turn)
#      is exact; only the small rest times l is rounded, an error ~2^(2k-23) |t| eps turns.
# The result is the phase reduced to [-1/2, 1/2] turns before cos/sin; float64 needs none of it.
_LN2_HI = (np.array(np.log(2.0), np.float32).view(np.uint32) & np.uint32(0xFFFFFF00)).view(
    np.float32)  # 16 significant bits, so j * _LN2_HI is exact for |j| < 2^8
_LN2_LO = np.float32(np.log(2.0) - np.float64(_LN2_HI))
_EXP_TABLE = np.exp(np.arange(-89, 90) / 256.0)  # covers |r| <= ln2/2 at 1/256 spacing
_EXP_TABLE_HI = _EXP_TABLE.astype(np.float32)
_EXP_TABLE_LO = (_EXP_TABLE - _EXP_TABLE_HI.astype(np.float64)).astype(np.float32)
_INV_2PI_HI = np.float32(1 / (2 * np.pi))
_INV_2PI_LO = np.float32(1 / (2 * np.pi) - np.float64(_INV_2PI_HI))


def _clear_low_bits(x: jax.Array, bits: int) -> jax.Array:
    """float32 x with its `bits` least significant mantissa bits zeroed (24 - bits remain)."""
    mask = np.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32) & mask, jnp.float32)


def _two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(p, e) with p = fl(a b) and a b = p + e exactly (Dekker; float32)."""
    p = a * b
    a_hi, b_hi = _clear_low_bits(a, 12), _clear_low_bits(b, 12)
    a_lo, b_lo = a - a_hi, b - b_hi
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _exp_hi_lo(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """exp(x) as hi + lo, float32, relative error < 1e-9 for |x| < 177 (vs 6e-8 for exp)."""
    j = jnp.round(x * np.float32(1 / np.log(2.0)))
    r_hi = x - j * _LN2_HI  # exact: Sterbenz, and j * _LN2_HI is exact
    i = jnp.clip(jnp.round(r_hi * 256.0), -89, 89)
    s = (r_hi - i / 256.0) - j * _LN2_LO  # |s| <~ 2^-9, first difference exact
    em1 = s + s * s * (0.5 + s * (1 / 6 + s / 24))  # expm1(s), truncation < 1e-14
    idx = (i + 89).astype(jnp.int32)
    t_hi, t_lo = jnp.asarray(_EXP_TABLE_HI)[idx], jnp.asarray(_EXP_TABLE_LO)[idx]
    j = j.astype(jnp.int32)
    return jnp.ldexp(t_hi, j), jnp.ldexp(t_lo + t_hi * em1, j)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _phase_turns(log_step_H: jax.Array, a_im_HN: jax.Array, length: int) -> jax.Array:
    """frac(l Delta A_im / 2pi) in [-1/2, 1/2] for l = 0..length-1, shape (H, N, length)."""
    l_11L = jnp.arange(length, dtype=a_im_HN.dtype)[None, None, :]
    if a_im_HN.dtype != jnp.float32:
        turns = jnp.exp(log_step_H)[:, None, None] * a_im_HN[..., None] * l_11L / (2 * np.pi)
        return turns - jnp.round(turns)
    dt_hi, dt_lo = _exp_hi_lo(log_step_H[:, None])
    p, e = _two_prod(jnp.broadcast_to(dt_hi, a_im_HN.shape), a_im_HN)
    e = e + dt_lo * a_im_HN
    t, t_lo = _two_prod(p, _INV_2PI_HI)
    t_lo = t_lo + (p * _INV_2PI_LO + e * _INV_2PI_HI)
    k = min(23, max(1, math.ceil(math.log2(length))))  # l < 2^k for every l
    t_top = _clear_low_bits(t, k)
    t_rest = (t - t_top) + t_lo
    f = t_top[..., None] * l_11L  # exact
    f = f - jnp.round(f)  # exact
    f = f + t_rest[..., None] * l_11L
    return f - jnp.round(f)


@_phase_turns.defjvp
def _phase_turns_jvp(length, primals, tangents):
    # The bit tricks above have no useful derivative; the phase's is l Delta (dlog_step A_im +
    # dA_im) / 2pi, linear in the tangents, so reverse mode works too.
    log_step_H, a_im_HN = primals
    dlog_step_H, da_im_HN = tangents
    l_11L = jnp.arange(length, dtype=a_im_HN.dtype)[None, None, :]
    dturns_HN = jnp.exp(log_step_H)[:, None] * (dlog_step_H[:, None] * a_im_HN + da_im_HN)
    return (_phase_turns(log_step_H, a_im_HN, length),
            dturns_HN[..., None] * l_11L / (2 * np.pi))


def _zoh(a_re_HN, a_im_HN, log_step_H):
    """ZOH discretization: (Delta Re A (H, N), A_bar (H, N), B_bar = (A_bar - 1) / A (H, N))."""
    a_re_HN = jnp.minimum(a_re_HN, _A_RE_MAX)
    decay_HN = jnp.exp(log_step_H)[:, None] * a_re_HN
    angle_HN = 2 * np.pi * _phase_turns(log_step_H, a_im_HN, 2)[..., 1]
    cos, sin = jnp.cos(angle_HN), jnp.sin(angle_HN)
    # exp(z) - 1 written with expm1 and 1 - cos = 2 sin^2(./2): no cancellation when |Delta A|
    # is tiny (A_re near the clip, A_im near 0), where exp(z) - 1 would lose most digits.
    a_bar_m1 = jax.lax.complex(jnp.expm1(decay_HN) * cos - 2 * jnp.sin(angle_HN / 2) ** 2,
                               jnp.exp(decay_HN) * sin)
    a_bar = jax.lax.complex(jnp.exp(decay_HN) * cos, jnp.exp(decay_HN) * sin)
    return decay_HN, a_bar, a_bar_m1 / jax.lax.complex(a_re_HN, a_im_HN)


def s4d_kernel(a_re_HN: jax.Array, a_im_HN: jax.Array, c_HN2: jax.Array, log_step_H: jax.Array,
               length: int) -> jax.Array:
    """The ZOH S4D convolution kernel K (H, length), in the params' dtype (f32 or f64).

    K[h, l] = Re sum_n C_hn (exp(Delta_h A_hn) - 1) / A_hn exp(l Delta_h A_hn), with
    A = min(A_re, -1e-4) + i A_im, Delta = exp(log_step), C = C[..., 0] + i C[..., 1].
    Complex64 arithmetic for float32 params (phase kept accurate, see above), complex128 for
    float64 params.
    """
    dtype = jnp.promote_types(a_re_HN.dtype, jnp.float32)
    a_re_HN, a_im_HN, c_HN2, log_step_H = (
        x.astype(dtype) for x in (a_re_HN, a_im_HN, c_HN2, log_step_H))
    b_bar_HN, re_HNL, im_HNL = _powers(a_re_HN, a_im_HN, log_step_H, length)
    cb_HN = jax.lax.complex(c_HN2[..., 0], c_HN2[..., 1]) * b_bar_HN
    # Re(cb · vander) in real arithmetic: half the work of a complex contraction, and a real
    # dot is what rematerialization policies such as `dots_saveable` can handle.
    # HIGHEST: GPUs/TPUs would otherwise run these f32 contractions in TF32/bf16 passes.
    return (jnp.einsum("hn,hnl->hl", cb_HN.real, re_HNL, precision="highest")
            - jnp.einsum("hn,hnl->hl", cb_HN.imag, im_HNL, precision="highest"))


def _powers(a_re_HN, a_im_HN, log_step_H, length: int):
    """(B_bar (H, N), Re and Im of exp(l Delta A) (H, N, length)) for l = 0..length-1, the
    phase reduced as in the kernel (module notes on float32 phase accuracy)."""
    decay_HN, _, b_bar_HN = _zoh(a_re_HN, a_im_HN, log_step_H)
    l_11L = jnp.arange(length, dtype=a_re_HN.dtype)[None, None, :]
    mag_HNL = jnp.exp(decay_HN[..., None] * l_11L)
    angle_HNL = 2 * np.pi * _phase_turns(log_step_H, a_im_HN, length)
    return b_bar_HN, mag_HNL * jnp.cos(angle_HNL), mag_HNL * jnp.sin(angle_HNL)


def resolve_mode(mode: str) -> str:
    """The S4D mode to run: `mode` itself, or for 'auto' the per-backend default (module
    docstring): 'fft' on CPU, 'chunked' (matmuls) on TPU and GPU."""
    if mode not in MODES + ("auto",):
        raise ValueError(f"unknown S4D mode {mode!r}; choose one of {list(MODES + ('auto',))}")
    if mode != "auto":
        return mode
    return "fft" if jax.default_backend() == "cpu" else "chunked"


def _chunk_operators(a_re_HN, a_im_HN, c_HN2, log_step_H, chunk: int, anticausal: bool):
    """The chunked path's matrices: R (H, C + 2N, C) = [Toeplitz; Re; Im of the chunk's
    contribution to the state], W (H, C, 2N) reading a carried state, A_bar^C (H, N) complex.

    Causal: the state after a chunk is sum_i A_bar^(C-1-i) u_i and token j reads
    Re(C B_bar A_bar^(j+1) state). Anticausal: the state before a chunk is sum_i A_bar^i u_i,
    read as Re(C B_bar A_bar^(C-j) state).
    """
    C = chunk
    b_bar_HN, re_HNl, im_HNl = _powers(a_re_HN, a_im_HN, log_step_H, C + 1)  # l = 0..C
    cb_HN = jax.lax.complex(c_HN2[..., 0], c_HN2[..., 1]) * b_bar_HN
    K_HC = (jnp.einsum("hn,hnl->hl", cb_HN.real, re_HNl[..., :C], precision="highest")
            - jnp.einsum("hn,hnl->hl", cb_HN.imag, im_HNl[..., :C], precision="highest"))
    lag_CC = jnp.arange(C)[:, None] - jnp.arange(C)[None, :]
    lag_CC = -lag_CC if anticausal else lag_CC
    T_HCC = jnp.where(lag_CC >= 0, K_HC[:, jnp.clip(lag_CC, 0)], 0)
    pow_HNl = jax.lax.complex(re_HNl, im_HNl)
    into_HNC = pow_HNl[..., :C] if anticausal else pow_HNl[..., C - 1::-1]
    read_HNC = cb_HN[..., None] * (pow_HNl[..., C:0:-1] if anticausal else pow_HNl[..., 1:])
    R_HRC = jnp.concatenate([T_HCC, into_HNC.real, into_HNC.imag], axis=1)
    W_HCK = jnp.swapaxes(jnp.concatenate([read_HNC.real, -read_HNC.imag], axis=1), 1, 2)
    return R_HRC, W_HCK, pow_HNl[..., C]


def chunked_conv(u_BLD: jax.Array, params_H: tuple, *, anticausal: bool = False,
                 chunk: int = CHUNK, precision: str = "fp32") -> jax.Array:
    """K * u along L (causal, or y_t = sum_(s>=t) K[s-t] u_s when anticausal) by chunked
    matmuls (module docstring); f32 u, params as `S4D._params_H`, no D skip."""
    B, L, D = u_BLD.shape
    shared = params_H[0].shape[0] == 1
    N = params_H[0].shape[-1]
    C = min(chunk, L)
    M = -(-L // C)
    R_HRC, W_HCK, lam_HN = _chunk_operators(*params_H, C, anticausal)
    u_GCD = jnp.pad(u_BLD, ((0, 0), (0, M * C - L), (0, 0))).reshape(B * M, C, D)
    if shared:  # a batched matmul: XLA would transpose u for "rs,gsd->grd"
        z_GRD = dot("grs,gsd->grd", jnp.broadcast_to(R_HRC, (B * M,) + R_HRC.shape[1:]),
                     u_GCD, precision)
    else:
        z_GRD = dot("drs,gsd->grd", R_HRC, u_GCD, precision)
    y_BMCD = z_GRD[:, :C].reshape(B, M, C, D)
    if M > 1:
        e_BMND = jax.lax.complex(z_GRD[:, C:C + N], z_GRD[:, C + N:]).reshape(B, M, N, D)
        lam_11ND = jnp.swapaxes(lam_HN, 0, 1)[None, None]  # (1, 1, N, H): H = 1 or D
        lam_BMND = jnp.broadcast_to(lam_11ND, e_BMND.shape)
        _, s_BMND = jax.lax.associative_scan(
            lambda e1, e2: (e2[0] * e1[0], e2[0] * e1[1] + e2[1]), (lam_BMND, e_BMND), axis=1,
            reverse=anticausal)
        zero = jnp.zeros_like(s_BMND[:, :1])  # chunk m reads the state carried into it
        s_BMND = (jnp.concatenate([s_BMND[:, 1:], zero], 1) if anticausal else
                  jnp.concatenate([zero, s_BMND[:, :-1]], 1))
        s_GKD = jnp.concatenate([s_BMND.real, s_BMND.imag], axis=2).reshape(B * M, 2 * N, D)
        if shared:
            y_GCD = dot("gck,gkd->gcd", jnp.broadcast_to(W_HCK, (B * M,) + W_HCK.shape[1:]),
                         s_GKD, precision)
        else:
            y_GCD = dot("dck,gkd->gcd", W_HCK, s_GKD, precision)
        y_BMCD = y_BMCD + y_GCD.reshape(B, M, C, D)
    return y_BMCD.reshape(B, M * C, D)[:, :L]


def _chunked_scan(u_LBD, keep_LB11, a_bar_HN, b_bar_HN, c_HN) -> jax.Array:
    """Re(C x_t) of x_t = keep_t A_bar x_(t-1) + B_bar u_t, (L, B, D), by two nested
    `lax.scan`s: over chunks of C ~ sqrt(L) tokens (each chunk rematerialized in the backward
    pass), and over the tokens of a chunk, returning y_t only. The backward pass holds the
    state (B, D, N) at the L/C chunk starts plus the C states of one chunk: O(sqrt(L) B D N),
    where a scan over all of L would hold L of them."""
    L = u_LBD.shape[0]
    C = 1 << max(0, math.ceil(math.log2(L) / 2))  # a power of two >= sqrt(L)
    M = -(-L // C)
    u_MCBD = jnp.pad(u_LBD, ((0, M * C - L), (0, 0), (0, 0))).reshape(
        (M, C) + u_LBD.shape[1:])
    keep_MCB11 = jnp.pad(keep_LB11, ((0, M * C - L), (0, 0), (0, 0), (0, 0)),
                         constant_values=1).reshape((M, C) + keep_LB11.shape[1:])

    def step(x_BDN, xs):
        u_BD, keep_B11 = xs
        x_BDN = keep_B11 * a_bar_HN[None] * x_BDN + b_bar_HN[None] * u_BD[..., None]
        return x_BDN, jnp.sum((c_HN[None] * x_BDN).real, axis=-1)

    @jax.checkpoint
    def chunk(x_BDN, xs):
        return jax.lax.scan(step, x_BDN, xs)

    B, D = u_LBD.shape[1:]
    x_BDN = jnp.zeros((B, D, a_bar_HN.shape[-1]), a_bar_HN.dtype)
    _, y_MCBD = jax.lax.scan(chunk, x_BDN, (u_MCBD, keep_MCB11))
    return y_MCBD.reshape((M * C,) + u_LBD.shape[1:])[:L]


def reverse_padded(x_BL: jax.Array, mask_BL: Optional[jax.Array], *,
                   official_padding: bool = False) -> jax.Array:
    """Reverses each sequence along axis 1 within its own length; pads stay where they are.

    Assumes right padding (each mask row is 1...1 0...0), so the reversed batch is still
    right-padded and a causal SSM on it never sees a pad before a real token. The map is its
    own inverse.

    Args:
      x_BL: (B, L, ...) array.
      mask_BL: (B, L) 1 for real tokens, 0 for pads; None means no padding.
      official_padding: plain flip over the full padded length, as the official BiGS code
        (pads then come first and feed the backward direction).

    Returns:
      The reversed array, shape and dtype of `x_BL`.
    """
    if mask_BL is None or official_padding:
        return jnp.flip(x_BL, axis=1)
    L = x_BL.shape[1]
    len_B1 = jnp.sum(mask_BL.astype(jnp.int32), axis=-1, keepdims=True)
    t_1L = jnp.arange(L)[None, :]
    idx_BL = jnp.where(t_1L < len_B1, len_B1 - 1 - t_1L, t_1L)
    idx = idx_BL.reshape(idx_BL.shape + (1,) * (x_BL.ndim - 2))
    return jnp.take_along_axis(x_BL, idx, axis=1)


class S4D(nnx.Module):
    """S4D layer: per-channel causal convolution with an S4D kernel plus a D skip.

    Attributes (params): A_re, A_im (N,) | (D, N); C (N, 2) | (D, N, 2) (real, imag);
    D (1,) | (D,); log_step (1,) | (D,). The first shapes are the shared (official) layout.
    """

    def __init__(self, features: int, *, state_size: int = 64, shared: bool = True,
                 init: str = "legs", dt_min: float = 0.01, dt_max: float = 1.0,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        """Args:
          features: number of channels D (sets the param shapes only when shared=False).
          state_size: N, modes per SSM.
          shared: one SSM for every channel (official BiGS) or one per channel.
          init: 'legs' | 'lin' | 'inv' (see `ssm_init`).
          dt_min, dt_max: log_step ~ U[log dt_min, log dt_max] (BiGS: 0.01, 1).
          param_dtype: dtype of all params; the kernel is computed in it (at least float32).
          rngs: `params` stream for C and log_step.
        """
        self.features, self.state_size, self.shared = features, state_size, shared
        N = state_size
        a_re, a_im = ssm_init(init, N)
        lead = () if shared else (features,)
        H = 1 if shared else features
        axes = ("state",) if shared else ("embed", "state")
        self.A_re = nnx.Param(jnp.broadcast_to(jnp.asarray(a_re, param_dtype), lead + (N,)),
                              **sharded(axes))
        self.A_im = nnx.Param(jnp.broadcast_to(jnp.asarray(a_im, param_dtype), lead + (N,)),
                              **sharded(axes))
        self.C = nnx.Param(
            jax.random.normal(rngs.params(), lead + (N, 2), param_dtype) * np.sqrt(0.5),
            **sharded(axes + (None,)))
        self.D = nnx.Param(jnp.ones((H,), param_dtype),
                           **sharded((None,) if shared else ("embed",)))
        self.log_step = nnx.Param(
            jax.random.uniform(rngs.params(), (H,), param_dtype, np.log(dt_min), np.log(dt_max)),
            **sharded((None,) if shared else ("embed",)))

    def _params_H(self):
        """Params in the compute dtype with a leading H axis (H = 1 when shared)."""
        dtype = jnp.promote_types(self.A_re[...].dtype, jnp.float32)
        a_re, a_im, c = self.A_re[...], self.A_im[...], self.C[...]
        if self.shared:
            a_re, a_im, c = a_re[None], a_im[None], c[None]
        return tuple(x.astype(dtype) for x in (a_re, a_im, c, self.log_step[...]))

    def recurrence(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(A_bar (H, N), B_bar (H, N), C (H, N)) of x_t = A_bar x_t-1 + B_bar u_t, Re(C x_t);
        complex. A decode loop computes them once and passes them to every `step`."""
        a_re, a_im, c, log_step = self._params_H()
        _, a_bar_HN, b_bar_HN = _zoh(a_re, a_im, log_step)
        return a_bar_HN, b_bar_HN, jax.lax.complex(c[..., 0], c[..., 1])

    def kernel(self, L: int) -> jax.Array:
        """The convolution kernel K, (1, L) when shared else (D, L)."""
        return s4d_kernel(*self._params_H(), L)

    def __call__(self, u_BLD: jax.Array, mask_BL: Optional[jax.Array] = None, *,
                 mode: str = "fft", segment_ids_BL: Optional[jax.Array] = None,
                 anticausal: bool = False, precision: str = "fp32") -> jax.Array:
        """y = K * u + D u along L for every channel.

        Args:
          u_BLD: input (B, L, D), any float dtype; output has the same dtype. The shared layer
            accepts any D.
          mask_BL: 1 for real tokens, 0 for pads; pads of u are zeroed first, so real tokens
            never see them (outputs at pad positions are meaningless).
          mode: 'fft' (rfft of size 2L, fp32 at least), 'chunked' (Toeplitz blocks plus the
            state carried between chunks, all matmuls; module docstring), 'scan' (the
            recurrence in chunks of ~sqrt(L) tokens, each recomputed in the backward pass:
            trains in O(sqrt(L) B D N) memory, `_chunked_scan`), 'recurrent' (one `lax.scan`
            over L, which keeps every state for the backward pass), 'toeplitz' (dense L x L
            matmul; reference for tests and short L), or 'auto' (`resolve_mode`).
          segment_ids_BL: packed rows (int, 1, 2, ... per example, 0 on pads): no output
            sees an input of another segment. The scans reset the state at each segment
            start; 'fft', 'chunked' and 'toeplitz' use the Toeplitz matrix masked to
            same-segment pairs (exact, O(L^2) per channel, which at pretraining lengths costs
            little next to the dense layers).
          anticausal: y_t = sum_(s>=t) K[s-t] u_s + D u_t, the backward direction: equal on
            real tokens to reversing each sequence within its length (`reverse_padded`),
            applying the causal layer and reversing back. 'chunked' computes it directly; the
            other modes flip L around the causal computation.
          precision: 'chunked' matmuls, one of `PRECISIONS`; the other modes run in fp32.

        Returns:
          y (B, L, D).
        """
        mode = resolve_mode(mode)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown S4D precision {precision!r}; choose one of "
                             f"{list(PRECISIONS)}")
        if anticausal and (mode != "chunked" or segment_ids_BL is not None):
            flip = lambda x: None if x is None else jnp.flip(jnp.asarray(x), axis=1)
            return flip(self(flip(u_BLD), flip(mask_BL), mode=mode, precision=precision,
                             segment_ids_BL=flip(segment_ids_BL)))
        B, L, D = u_BLD.shape
        out_dtype = u_BLD.dtype
        dtype = jnp.promote_types(self.A_re[...].dtype, jnp.float32)  # fp32 even for bf16 u
        u_BLD = u_BLD.astype(dtype)
        if mask_BL is not None:
            u_BLD = u_BLD * mask_BL[..., None].astype(dtype)
        if segment_ids_BL is not None:
            seg_BL = jnp.asarray(segment_ids_BL)
            start_BL = jnp.concatenate(
                [jnp.ones_like(seg_BL[:, :1], bool), seg_BL[:, 1:] != seg_BL[:, :-1]], axis=1)
            if mode in ("fft", "chunked"):
                mode = "toeplitz"
        if mode == "fft":
            # Zero padding to 2L turns the FFT's circular convolution into the linear one.
            k_FH = jnp.fft.rfft(self.kernel(L), n=2 * L, axis=-1).T
            u_BFD = jnp.fft.rfft(u_BLD, n=2 * L, axis=1)
            y_BLD = jnp.fft.irfft(u_BFD * k_FH[None], n=2 * L, axis=1)[:, :L]
        elif mode == "chunked":
            y_BLD = chunked_conv(u_BLD, self._params_H(), anticausal=anticausal,
                                 precision=precision)
        elif mode == "toeplitz":
            K_HL = self.kernel(L)
            lag_LL = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
            T_HLL = jnp.where(lag_LL >= 0, K_HL[:, jnp.clip(lag_LL, 0)], 0)
            if segment_ids_BL is not None:
                same_BLL = (seg_BL[:, :, None] == seg_BL[:, None, :]).astype(dtype)
                sub = "ts" if self.shared else "dts"
                y_BLD = jnp.einsum(f"bts,{sub},bsd->btd", same_BLL,
                                   T_HLL[0] if self.shared else T_HLL, u_BLD,
                                   precision="highest")
            elif self.shared:
                y_BLD = jnp.einsum("ts,bsd->btd", T_HLL[0], u_BLD, precision="highest")
            else:
                y_BLD = jnp.einsum("dts,bsd->btd", T_HLL, u_BLD, precision="highest")
        else:
            a_bar_HN, b_bar_HN, c_HN = self.recurrence()
            u_LBD = jnp.swapaxes(u_BLD, 0, 1)
            # A segment start multiplies the carried state by 0: a fresh state per segment.
            keep_LB11 = (jnp.ones((L, 1, 1, 1), a_bar_HN.dtype) if segment_ids_BL is None else
                         (~start_BL).T[..., None, None].astype(a_bar_HN.dtype))
            if mode == "scan":
                y_LBD = _chunked_scan(u_LBD, keep_LB11, a_bar_HN, b_bar_HN, c_HN)
            else:
                def body(x_BDN, xs):
                    u_BD, keep_B11 = xs
                    x_BDN = (keep_B11 * a_bar_HN[None] * x_BDN
                             + b_bar_HN[None] * u_BD[..., None])
                    return x_BDN, x_BDN
                x_BDN = jnp.zeros((B, D, self.state_size), a_bar_HN.dtype)
                _, x_LBDN = jax.lax.scan(body, x_BDN, (u_LBD, keep_LB11))
                y_LBD = jnp.sum((c_HN[None, None] * x_LBDN).real, axis=-1)
            y_BLD = jnp.swapaxes(y_LBD, 0, 1)
        return (y_BLD + self.D[...].astype(dtype)[None, None, :] * u_BLD).astype(out_dtype)

    def init_state(self, batch: int, features: Optional[int] = None) -> jax.Array:
        """Zero recurrent state (batch, D, N), complex; D defaults to `self.features`."""
        dtype = jnp.promote_types(self.A_re[...].dtype, jnp.float32)
        features = self.features if features is None else features
        return jnp.zeros((batch, features, self.state_size), jnp.result_type(dtype, jnp.complex64))

    def final_state(self, u_BLD: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """The recurrent state after each row's last real token, (B, D, N) complex.

        x_(n-1) = sum_k B_bar exp(k Delta A) u_(n-1-k) over k < n = lengths_B, with the
        powers computed as the kernel's are: the prefill of recurrent decoding, so `step`
        continues a right-padded prompt exactly where the parallel path leaves it. Costs
        O(B L D N), one real contraction over L, and no (B, L, D, N) intermediate.
        """
        a_re, a_im, _, log_step = self._params_H()
        L = u_BLD.shape[1]
        mask_BL = jnp.arange(L)[None, :] < lengths_B[:, None]
        u_BLD = u_BLD.astype(a_re.dtype) * mask_BL[..., None].astype(a_re.dtype)
        rev_BKD = reverse_padded(u_BLD, mask_BL)  # rev[k] = u[n-1-k] for k < n, else 0
        b_bar_HN, re_HNK, im_HNK = _powers(a_re, a_im, log_step, L)
        if self.shared:  # one SSM: the same powers for every channel
            sub, re_HNK, im_HNK = "nk,bkd->bdn", re_HNK[0], im_HNK[0]
        else:
            sub = "dnk,bkd->bdn"
        x_re = jnp.einsum(sub, re_HNK, rev_BKD, precision="highest")
        x_im = jnp.einsum(sub, im_HNK, rev_BKD, precision="highest")
        return jax.lax.complex(x_re, x_im) * b_bar_HN[None]

    def step(self, x_BDN: jax.Array, u_BD: jax.Array,
             recurrence: Optional[tuple] = None) -> tuple[jax.Array, jax.Array]:
        """One token of the recurrence: x = A_bar x + B_bar u, y = Re(C x) + D u.

        Args:
          x_BDN: state from `init_state`, `final_state` or the previous step.
          u_BD: the new token's input (B, D).
          recurrence: `recurrence()`, computed once outside a decode loop; None computes it.

        Returns:
          (new state, y (B, D) in u's dtype).
        """
        a_bar_HN, b_bar_HN, c_HN = self.recurrence() if recurrence is None else recurrence
        u32_BD = u_BD.astype(a_bar_HN.real.dtype)
        x_BDN = a_bar_HN[None] * x_BDN + b_bar_HN[None] * u32_BD[..., None]
        y_BD = (jnp.sum((c_HN[None] * x_BDN).real, axis=-1)
                + self.D[...].astype(u32_BD.dtype)[None, :] * u32_BD)
        return x_BDN, y_BD.astype(u_BD.dtype)
