"""Monarch Mixer sequence-mixer pieces: implicit long filters, long convolutions, short conv.

Monarch Mixer: Fu et al., "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture",
NeurIPS 2023, https://arxiv.org/abs/2310.12109. The implicit filter is Hyena's (Poli et al.,
arXiv 2302.10866) as the official M2-BERT code uses it (research/m2.md §2.1–2.2).

`ImplicitFilter` turns fixed positional features into a length-L kernel per channel: a small
MLP with sine activations (one learned frequency vector shared by all three sines and by both
directions) maps learned features z[t] (initialized to [t/(l_max-1), cos(f·ω_t), -sin(f·ω_t)])
to H channels, and an exponential decay exp(-t·|δ_h|) with fixed per-channel rates shapes it.
The fixed time grid t and the rates δ are buffers in the official code; here they are numpy
constants recomputed from (l_max, H), so they are not parameters. A bidirectional filter has
a second MLP for the backward kernel; both share z and the frequency.

`long_conv` applies the kernels. Bidirectionally,

    y[t] = Σ_{s≤t} k_fwd[t-s]·u[s] + Σ_{s>t} k_rev[s-t-1]·u[s]

which the official code computes as one circular FFT convolution of length 2L with the kernel
[k_fwd, 0] + [0, flip(k_rev)] (the wrap-around places k_rev on the future); the D skip
(`bias`) is added by the filter. Causally only the first sum remains. Modes: `fft` (jnp.fft),
`monarch` (the same FFT as Monarch GEMMs, `bigs_jax.layers.monarch`), `toeplitz` (the dense
L×L matrix; O(L²), but a future input has an exactly-zero weight, so causality is exact rather
than exact up to FFT round-off), and `auto` (`resolve_conv_mode`), the per-backend default:
`fft` on CPU (XLA's FFT; the Monarch DFT is 3-10x slower there, README bench/monarch.py),
`monarch` on TPU and GPU, where its GEMMs run on the matrix units (as FlashFFTConv, the
official code's GPU path, does; TPU FFTs are slow). Not yet timed on an accelerator here.

The two matmul modes take a `precision` (`bigs_jax.layers.precision`): 'fp32' (HIGHEST, the
default), 'bf16_3x' (three bf16 products per real product, f32 accumulation) or 'bf16' (one);
`fft` runs in fp32 whatever it is. Against the fp32 FFT path, relative to max |y|, with
M2-BERT's filter (order 128) at L = 1000 and 2048, bidirectional and causal
(tests/layers/test_longconv.py): fp32 3e-7 to 9e-7; bf16_3x 7.0e-6 to 1.0e-5 (monarch) and
4.3e-6 to 4.5e-6 (toeplitz), within issue 18's 1e-4; bf16 4.6e-3 to 7.2e-3 (monarch) and
1.9e-3 to 2.1e-3 (toeplitz), bounded at 1e-2. Through a whole m2-bert-tiny / m2-gpt-tiny
(tests/models/test_m2.py), monarch bf16_3x moves the logits and hidden states by 8e-6 to
1.1e-5 of their max. The backward pass runs at the same level: bf16_3x gradients (input and
kernels) are within 4.8e-6 to 8.2e-6 of the FFT path's at L = 512.

Padding: the kernel depends only on the offset t-s (z and t are sliced, not resampled, for a
shorter L), so zeroing the inputs at right-padded positions makes every real output equal to
that of the unpadded sequence; no reversal is needed, unlike a recurrence. `ShortConv` is
causal, so right pads never reach real tokens through it.

Dimension key: B batch, L length, D channels (model width), C channels of the short conv,
E positional-feature size, O filter-MLP width (order), K short-conv taps.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigs_jax.layers.blocks import per_shard
from bigs_jax.layers.linear import sharded
from bigs_jax.layers.monarch import fft_conv
from bigs_jax.layers.precision import check_precision, dot

CONV_MODES = ("fft", "monarch", "toeplitz")
# The official ExponentialModulation defaults: the fastest channel decays to `target` within
# 30% of l_max, the slowest within 150%.
_DECAY_TARGET, _FAST_DECAY_PCT, _SLOW_DECAY_PCT = 1e-2, 0.3, 1.5


def resolve_conv_mode(mode: str) -> str:
    """The long-conv mode to run: `mode` itself, or for 'auto' the per-backend default
    (module docstring): 'fft' on CPU, 'monarch' (the matmul DFT) on TPU and GPU."""
    if mode not in CONV_MODES + ("auto",):
        raise ValueError(f"unknown long-conv mode {mode!r}; choose one of "
                         f"{list(CONV_MODES + ('auto',))}")
    if mode != "auto":
        return mode
    return "fft" if jax.default_backend() == "cpu" else "monarch"


def filter_time(l_max: int) -> np.ndarray:
    """(l_max, 1) time grid t = linspace(0, 1, l_max) (the official `pos_emb.t` buffer)."""
    return np.linspace(0.0, 1.0, l_max, dtype=np.float64)[:, None].astype(np.float32)


def positional_features(l_max: int, emb_dim: int = 5) -> np.ndarray:
    """(l_max, emb_dim) initial value of z: [t, cos(f·w), -sin(f·w)].

    With bands = (emb_dim - 1) // 2, f = linspace(1e-4, bands - 1, bands) and
    w = 2π·arange(l_max)/l_max, as the official `PositionalEmbedding`.
    """
    bands = (emb_dim - 1) // 2
    w_L1 = 2 * np.pi * np.arange(l_max, dtype=np.float64)[:, None] / l_max
    f_1F = np.linspace(1e-4, bands - 1, bands)[None, :]
    t_L1 = np.linspace(0.0, 1.0, l_max)[:, None]
    z = np.concatenate([t_L1, np.cos(f_1F * w_L1), -np.sin(f_1F * w_L1)], axis=-1)
    return z.astype(np.float32)


def tile_channels(x: np.ndarray, tiling=()) -> np.ndarray:
    """x (..., D0) laid out as the channels of a model widened by duplication: for each
    (blocks, copies) of `tiling` in turn, the last axis is split into `blocks` consecutive
    blocks and each block repeated `copies` times in place ([a, b] with (2, 2): [a, a, b, b]),
    the layout `bigs_jax.growth_m2` gives the residual stream."""
    for blocks, copies in tiling:
        if x.shape[-1] % blocks:
            raise ValueError(f"decay_tiling: {blocks} blocks do not divide {x.shape[-1]} "
                             "channels; it must list the (blocks, copies) of this model's "
                             "width growths")
        x_KP = x.reshape(*x.shape[:-1], blocks, 1, x.shape[-1] // blocks)
        x = np.broadcast_to(x_KP, x_KP.shape[:-2] + (copies, x_KP.shape[-1]))
        x = x.reshape(*x.shape[:-3], -1)
    return x


def modulation_deltas(features: int, tiling=()) -> np.ndarray:
    """(features,) decay rates δ = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, features).

    With a `tiling` (`tile_channels`; a width-grown M2's `decay_tiling`) the linspace is over
    the pre-growth width features / Π copies, laid out by the tiling, so every channel keeps
    the rate it had before growth.
    """
    base = features // math.prod(c for _, c in tiling)
    if base * math.prod(c for _, c in tiling) != features:
        raise ValueError(f"decay_tiling {tuple(tiling)} does not divide {features} channels; "
                         "it must list the (blocks, copies) of this model's width growths")
    deltas = np.linspace(math.log(_DECAY_TARGET) / _SLOW_DECAY_PCT,
                         math.log(_DECAY_TARGET) / _FAST_DECAY_PCT, base).astype(np.float32)
    return np.ascontiguousarray(tile_channels(deltas, tiling))


def _torch_linear(in_features: int, out_features: int, axes, *, use_bias: bool,
                  rngs: nnx.Rngs) -> nnx.Linear:
    # torch.nn.Linear's default init, U(±1/√fan_in) for weight and bias, which sets the scale of
    # the sine MLP's inputs (the official filter MLPs keep it).
    bound = 1 / math.sqrt(in_features)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=init,
                      bias_init=init, precision=jax.lax.Precision.HIGHEST, rngs=rngs,
                      kernel_metadata=sharded(axes), bias_metadata=sharded((axes[1],)))


def _filter_mlp(emb_dim: int, order: int, features: int, rngs: nnx.Rngs) -> nnx.List:
    # Every kernel but the tiny first one is split over fsdp and tensor (the filter width O
    # taking the role of an MLP width), or a large M2's filters would be replicated bytes.
    return nnx.List([
        _torch_linear(emb_dim, order, (None, None), use_bias=True, rngs=rngs),
        _torch_linear(order, order, ("embed", "mlp"), use_bias=True, rngs=rngs),
        _torch_linear(order, order, ("embed", "mlp"), use_bias=True, rngs=rngs),
        _torch_linear(order, features, ("mlp", "embed"), use_bias=False, rngs=rngs),
    ])


class ImplicitFilter(nnx.Module):
    """Hyena implicit long filter plus the per-channel skip D (official `HyenaFilter`).

    Params: `z` (l_max, E) positional features, `freq` (O,) sine frequency, `bias` (D,) the
    skip D, `implicit_filter` (4 Linears: E→O→O→O→D, the last without bias) and, when
    bidirectional, `implicit_filter_rev` (the same for the backward kernel).
    """

    def __init__(self, features: int, *, l_max: int, order: int = 128, emb_dim: int = 5,
                 w: float = 10.0, w_mod: float = 1.0, bidirectional: bool = True,
                 decay_tiling: tuple = (), rngs: nnx.Rngs):
        """Builds the filter.

        Args:
          features: channels D.
          l_max: longest sequence; z has this many rows and t, δ are laid out on it.
          order: width O of the filter MLP (128 in every released config).
          emb_dim: positional-feature size E (odd; 5 in the official configs).
          w: initial sine frequency (`hyena_w`).
          w_mod: fixed multiplier of the frequency (`hyena_w_mod`).
          bidirectional: also build the backward-kernel MLP.
          decay_tiling: channel layout of the decay rates after width growth
            (`modulation_deltas`); () for the official linspace.
          rngs: random streams.
        """
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"ImplicitFilter: emb_dim must be odd and >= 3, got {emb_dim}")
        self.features, self.l_max, self.w_mod = features, l_max, float(w_mod)
        self.decay_tiling = tuple(tuple(pair) for pair in decay_tiling)
        self.bidirectional = bidirectional
        self.z = nnx.Param(jnp.asarray(positional_features(l_max, emb_dim)),
                           **sharded((None, None)))
        self.freq = nnx.Param(jnp.full((order,), w, jnp.float32), **sharded((None,)))
        # Official init: D ~ N(0, 1).
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (features,), jnp.float32),
                              **sharded(("embed",)))
        self.implicit_filter = _filter_mlp(emb_dim, order, features, rngs)
        self.implicit_filter_rev = nnx.data(
            _filter_mlp(emb_dim, order, features, rngs) if bidirectional else None)

    def _mlp(self, layers: nnx.List, z_LE: jax.Array) -> jax.Array:
        """The filter MLP on rows of z, returned channel-major: (D, L)."""
        freq_1O = self.w_mod * self.freq[...][None, :]
        h = z_LE
        for layer in layers[:-1]:
            h = jnp.sin(freq_1O * layer(h))
        # The bias-free last layer writes (D, L) directly, the layout the FFT wants.
        return jnp.einsum("LO,OD->DL", h, layers[-1].kernel[...],
                          precision=jax.lax.Precision.HIGHEST)

    def _decay(self, t_L: np.ndarray) -> jax.Array:
        """(D, L) exp(-t·|δ|), computed in the graph (an (L, D) numpy constant per call would
        put L·D floats into the program for every filter)."""
        delta_D = np.abs(modulation_deltas(self.features, self.decay_tiling))
        return jnp.exp(-jnp.asarray(delta_D)[:, None] * jnp.asarray(t_L)[None, :])

    def _check_length(self, length: int) -> None:
        if length > self.l_max:
            raise ValueError(f"sequence length {length} exceeds the filter's l_max {self.l_max}; "
                             "build the model with a larger max_len")

    def kernels(self, length: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """(k_fwd, k_rev), each (L, D) float32 (k_rev None when causal), for length L ≤ l_max."""
        self._check_length(length)
        z_LE = self.z[...][:length].astype(jnp.float32)
        decay_DL = self._decay(filter_time(self.l_max)[:length, 0])
        k_fwd_DL = self._mlp(self.implicit_filter, z_LE) * decay_DL
        if not self.bidirectional:
            return k_fwd_DL.T, None
        return k_fwd_DL.T, (self._mlp(self.implicit_filter_rev, z_LE) * decay_DL).T

    def circular_kernel(self, length: int) -> jax.Array:
        """The kernel `long_conv` convolves with, channel-major: (D, 2L) [k_fwd, flip(k_rev)]
        bidirectionally, (D, L) k_fwd causally.

        flip(k_rev) is computed as the MLP on the reversed rows of z times the reversed decay
        (the MLP acts row by row), so no (D, L) array is reversed or transposed.
        """
        self._check_length(length)
        z_LE = self.z[...][:length].astype(jnp.float32)
        t_L = filter_time(self.l_max)[:length, 0]
        if not self.bidirectional:
            return self._mlp(self.implicit_filter, z_LE) * self._decay(t_L)
        # One decay over the 2L columns: XLA fuses the concatenation, the exp and the product
        # into one pass over the kernel (three passes when each half is scaled first).
        mlp_DN = jnp.concatenate([self._mlp(self.implicit_filter, z_LE),
                                  self._mlp(self.implicit_filter_rev, z_LE[::-1])], axis=-1)
        return mlp_DN * self._decay(np.concatenate([t_L, t_L[::-1]]))

    def __call__(self, u_BLD: jax.Array, *, mode: str = "fft",
                 precision: str = "fp32") -> jax.Array:
        """y = long_conv(u, k_fwd, k_rev) + D ⊙ u, in float32.

        `mode`: one of `CONV_MODES` or 'auto' (`resolve_conv_mode`); `precision`: the
        matmuls of the 'monarch' and 'toeplitz' modes, one of `precision.PRECISIONS` ('fft' runs
        `jnp.fft` in float32 whatever it is).
        """
        mode = _check(mode, precision)
        u_BLD = u_BLD.astype(jnp.float32)
        skip_BLD = self.bias[...][None, None, :] * u_BLD
        if mode == "toeplitz":
            return long_conv(u_BLD, *self.kernels(u_BLD.shape[1]), mode=mode,
                             precision=precision) + skip_BLD
        conv = per_shard(functools.partial(circular_conv, mode=mode, precision=precision),
                         (("batch", None, "mlp"), ("mlp", None)), ("batch", None, "mlp"))
        return conv(u_BLD, self.circular_kernel(u_BLD.shape[1])) + skip_BLD

    def channel_major(self, u_BDL: jax.Array, *, mode: str = "fft",
                      precision: str = "fp32") -> jax.Array:
        """`__call__` on channel-major u (B, D, L) → (B, D, L) float32: the FFT runs along
        the last axis as it is, with no transpose in or out."""
        mode = _check(mode, precision)
        u_BDL = u_BDL.astype(jnp.float32)
        skip_BDL = self.bias[...][None, :, None] * u_BDL
        L = u_BDL.shape[2]
        if mode == "toeplitz":
            w_LLD = toeplitz_weights(*self.kernels(L))
            return dot("tsd,bds->bdt", w_LLD, u_BDL, precision) + skip_BDL
        conv = per_shard(functools.partial(fft_conv, n_fft=2 * L, use_monarch=mode == "monarch",
                                           precision=precision),
                         (("batch", "mlp", None), ("mlp", None)), ("batch", "mlp", None))
        return conv(u_BDL, self.circular_kernel(L)) + skip_BDL

    # Decoding (causal filters): y[p] = Σ_{s≤p} k[p-s]·v[s] + D·v[p] read from a cache of the
    # inputs v, O(S·D) per token for S cached positions, exact (no FFT round-off).

    def decode_table(self, length: int) -> jax.Array:
        """(2S-1, D) [flip(k_fwd); 0] for S = `length`: its rows S-1-p .. 2S-2-p are the
        weights of inputs 0..S-1 for the output at position p (zero on the future)."""
        if self.bidirectional:
            raise ValueError("decoding needs a causal filter; this one is bidirectional")
        k_SD = self.circular_kernel(length).T
        return jnp.concatenate([k_SD[::-1], jnp.zeros((length - 1, self.features),
                                                      k_SD.dtype)], axis=0)

    def decode(self, u_BSD: jax.Array, table: jax.Array, pos_B: jax.Array) -> jax.Array:
        """(B, 1, D) float32 output at position `pos_B` of the inputs cached in `u_BSD`
        (float32, written up to pos_B), with the skip D; `table` from `decode_table`."""
        S = u_BSD.shape[1]
        w_BSD = jax.vmap(lambda p: jax.lax.dynamic_slice_in_dim(table, S - 1 - p, S))(pos_B)
        y_BD = jnp.einsum("BSD,BSD->BD", w_BSD, u_BSD, precision=jax.lax.Precision.HIGHEST)
        u_BD = u_BSD[jnp.arange(u_BSD.shape[0]), pos_B]
        return (y_BD + self.bias[...][None, :] * u_BD)[:, None, :]


def _check(mode: str, precision: str) -> str:
    """The resolved mode, after one-line errors for an unknown mode or precision."""
    check_precision(precision, "long-conv precision")
    return resolve_conv_mode(mode)


def long_conv(u_BLD: jax.Array, k_fwd_LD: jax.Array, k_rev_LD: Optional[jax.Array] = None, *,
              mode: str = "fft", precision: str = "fp32") -> jax.Array:
    """Per-channel long convolution along L (module docstring), without the D skip.

    Args:
      u_BLD: (B, L, D) input.
      k_fwd_LD: (L, D) kernel on the present and past: k_fwd[j] weights u[t-j].
      k_rev_LD: (L, D) kernel on the future: k_rev[j] weights u[t+j+1]; None for causal.
      mode: `fft`, `monarch`, `toeplitz` or `auto` (`resolve_conv_mode`).
      precision: the matmuls of `monarch` and `toeplitz`, one of `precision.PRECISIONS`; `fft`
        ignores it (float32).

    Returns:
      (B, L, D) float32.
    """
    mode = _check(mode, precision)
    u_BLD = u_BLD.astype(jnp.float32)
    if mode == "toeplitz":
        return dot("tsd,bsd->btd", toeplitz_weights(k_fwd_LD, k_rev_LD), u_BLD, precision)
    k_DN = k_fwd_LD.T  # causal: zero padding to 2L in fft_conv keeps the future out
    if k_rev_LD is not None:
        k_DN = jnp.concatenate([k_DN, k_rev_LD.T[:, ::-1]], axis=-1)
    return circular_conv(u_BLD, k_DN, mode=mode, precision=precision)


def toeplitz_weights(k_fwd_LD: jax.Array, k_rev_LD: Optional[jax.Array]) -> jax.Array:
    """(L, L, D) weights w[t, s] of input s in output t (`long_conv`'s toeplitz mode)."""
    L = k_fwd_LD.shape[0]
    t_L1, s_1L = np.arange(L)[:, None], np.arange(L)[None, :]
    w_LLD = jnp.where((s_1L <= t_L1)[..., None], k_fwd_LD[np.clip(t_L1 - s_1L, 0, L - 1)], 0.0)
    if k_rev_LD is not None:
        w_LLD = w_LLD + jnp.where((s_1L > t_L1)[..., None],
                                  k_rev_LD[np.clip(s_1L - t_L1 - 1, 0, L - 1)], 0.0)
    return w_LLD


def circular_conv(u_BLD: jax.Array, k_DN: jax.Array, *, mode: str = "fft",
                  precision: str = "fp32") -> jax.Array:
    """(B, L, D) float32 y[t] = Σ_s k[(t - s) mod 2L]·u[s] along L by a length-2L FFT, with the
    channel-major kernel k_DN of length N = L (causal) or 2L ([k_fwd, flip(k_rev)]); `mode`
    'monarch' runs the DFTs as GEMMs at `precision`, any other mode by `jnp.fft`."""
    L = u_BLD.shape[1]
    y_BDL = fft_conv(jnp.swapaxes(u_BLD.astype(jnp.float32), 1, 2), k_DN, 2 * L,
                     use_monarch=resolve_conv_mode(mode) == "monarch", precision=precision)
    return jnp.swapaxes(y_BDL, 1, 2)


class ShortConv(nnx.Module):
    """Depthwise causal convolution: y[t] = Σ_j kernel[j]·x[t-K+1+j] + bias.

    The official `short_filter` is `Conv1d(C, C, K, groups=C, padding=K-1)` cropped to the
    first L outputs, i.e. causal even in the bidirectional model; its weight (C, 1, K) loads as
    `kernel = weight[:, 0, :].T`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, axis: Optional[str] = "mlp",
                 rngs: nnx.Rngs):
        """Builds the conv.

        Args:
          channels: C, one filter per channel.
          kernel_size: K taps.
          axis: logical axis name of the channels.
          rngs: random streams.
        """
        # torch Conv1d default init: U(±1/√fan_in) with fan_in = K for a depthwise conv.
        bound = 1 / math.sqrt(kernel_size)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels),
                                                   jnp.float32, -bound, bound),
                                **sharded((None, axis)))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32,
                                                 -bound, bound), **sharded((axis,)))

    def __call__(self, x_BLC: jax.Array) -> jax.Array:
        """(B, L, C) → (B, L, C) in the dtype of x."""
        kernel_KC = self.kernel[...].astype(x_BLC.dtype)
        K, L = kernel_KC.shape[0], x_BLC.shape[1]
        # Explicit shifted sums: future taps are structurally absent, so causality is exact.
        xp_BLC = jnp.pad(x_BLC, ((0, 0), (K - 1, 0), (0, 0)))
        y_BLC = sum(kernel_KC[j][None, None, :] * xp_BLC[:, j:j + L] for j in range(K))
        return y_BLC + self.bias[...].astype(x_BLC.dtype)[None, None, :]

    def channel_major(self, x_BCL: jax.Array) -> jax.Array:
        """`__call__` on channel-major x: (B, C, L) → (B, C, L)."""
        kernel_KC = self.kernel[...].astype(x_BCL.dtype)
        K, L = kernel_KC.shape[0], x_BCL.shape[2]
        xp_BCL = jnp.pad(x_BCL, ((0, 0), (0, 0), (K - 1, 0)))
        y_BCL = sum(kernel_KC[j][None, :, None] * xp_BCL[:, :, j:j + L] for j in range(K))
        return y_BCL + self.bias[...].astype(x_BCL.dtype)[None, :, None]

    def decode(self, x_B1C: jax.Array, prev_BKC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One new input per row after the K-1 before it (`prev_BKC`, oldest first; zeros
        before the sequence start): (output (B, 1, C), the K-1 inputs for the next step)."""
        kernel_KC = self.kernel[...].astype(x_B1C.dtype)
        window_BKC = jnp.concatenate([prev_BKC.astype(x_B1C.dtype), x_B1C], axis=1)
        y_B1C = sum(kernel_KC[j][None, None, :] * window_BKC[:, j:j + 1]
                    for j in range(kernel_KC.shape[0]))
        return (y_B1C + self.bias[...].astype(x_B1C.dtype)[None, None, :],
                window_BKC[:, 1:])
