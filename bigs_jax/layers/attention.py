"""Multi-head self-attention with independent q/k and v head sizes, one kernel per backend.

Vaswani et al. 2017 (arXiv 1706.03762). The q/k head dim K and the v head dim V are separate
settings, so attention variants with narrow keys (or the BiGS paper's gated-attention ablation)
need no special class. Softmax statistics are fp32 whatever the compute dtype (float64 stays
float64).

Masks travel as their structured pieces (`AttentionMask`: key padding, segment ids, causal
flag, query positions), never as a dense (L, S) matrix, so memory stays linear in the length.
`dot_product_attention` picks the kernel (`choose_kernel`):

- "cudnn" on GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash
  attention) for fp16/bf16 with K = V a multiple of 8 up to 128, no segment ids, no dropout
  and queries at 0..L-1; key padding goes in as per-row key counts, i.e. as right padding
  (every model's input contract here); a batch that is not right-padded (checked on the
  device) runs the blocked kernel instead.
- "splash" on TPU: Pallas splash attention (`jax.experimental.pallas.ops.tpu`) for L and S
  multiples of 128 and K = V, without dropout, queries at 0..L-1; key padding becomes segment
  id -1 on the pads.
- "blocked" everywhere else (the CPU kernel, and the GPU/TPU fallback):
  `flash.flash_attention`, online softmax over (query block, key block) tiles with a backward
  that recomputes the tiles, and attention dropout inside the kernel. When a GPU or TPU call
  falls back to it, one log line per reason says why.

Dimension key: B batch, L query length, S key length, D model, H heads, K q/k head dim,
V v head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from bigs_jax.layers.flash import Masks, flash_attention
from bigs_jax.layers.linear import Dtype, dense

log = logging.getLogger(__name__)
KERNELS = ("cudnn", "splash", "blocked")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Who attends to whom, in pieces (every one optional).

    key_BS: True for real keys (padding masks keys only: a pad query still attends to real
    keys, which keeps its row finite; its output is never read). segment_ids_BL: packed rows,
    equal ids attend (0 on pads). causal: a query sees the keys at positions <= its own;
    positions_BL: the queries' positions (0..L-1 when None; decoding against a cache sets
    them).
    """
    key_BS: Optional[jax.Array] = None
    segment_ids_BL: Optional[jax.Array] = None
    positions_BL: Optional[jax.Array] = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def dense(self, L: int, S: int) -> Optional[jax.Array]:
        """The (B|1, 1, L, S) boolean matrix (True = may attend), for references and tests."""
        mask = None
        if self.key_BS is not None:
            mask = self.key_BS.astype(bool)[:, None, None, :]
        if self.segment_ids_BL is not None:
            seg = self.segment_ids_BL
            same = seg[:, None, :, None] == seg[:, None, None, :]
            mask = same if mask is None else mask & same
        if self.causal:
            pos = (jnp.arange(L)[None, :] if self.positions_BL is None
                   else self.positions_BL)
            tri = jnp.arange(S)[None, None, None, :] <= pos[:, None, :, None]
            mask = tri if mask is None else mask & tri
        return mask


def make_attention_mask(
    mask_BL: Optional[jax.Array],
    L: int,
    *,
    causal: bool = False,
    segment_ids_BL: Optional[jax.Array] = None,
) -> Optional[AttentionMask]:
    """The `AttentionMask` of a right-padded batch (None when nothing masks)."""
    del L  # the pieces carry the length
    if mask_BL is None and segment_ids_BL is None and not causal:
        return None
    return AttentionMask(None if mask_BL is None else mask_BL.astype(bool),
                         segment_ids_BL, None, causal)


def choose_kernel(backend: str, dtype, K: int, V: int, L: int, S: int,
                  mask: Optional[AttentionMask], dropout: bool) -> tuple[str, str]:
    """(kernel name, why) for a call; see the module docstring."""
    mask = mask or AttentionMask()
    if backend not in ("gpu", "cuda", "rocm", "tpu"):
        return "blocked", ""
    if dropout:
        return "blocked", f"attention dropout on {backend} (its fused kernel has none)"
    if mask.positions_BL is not None:
        return "blocked", "queries at given positions (decoding)"
    if backend == "tpu":
        if L % 128 or S % 128 or K != V:
            return "blocked", (f"splash needs L, S multiples of 128 and K = V "
                               f"(L={L}, S={S}, K={K}, V={V})")
        return "splash", ""
    if mask.segment_ids_BL is not None:
        return "blocked", "segment ids (cuDNN takes none)"
    if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16) or K != V or K % 8 or K > 128:
        return "blocked", (f"cuDNN needs fp16/bf16 and K = V, a multiple of 8 up to 128 "
                           f"(got {jnp.dtype(dtype).name}, K={K}, V={V})")
    return "cudnn", ""


@functools.lru_cache(maxsize=None)
def _log_fallback(why: str) -> None:
    log.warning("attention: blocked XLA kernel instead of the fused one: %s", why)


def dot_product_attention(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
                          mask: Optional[AttentionMask] = None, *, dropout_rate: float = 0.0,
                          dropout_key: Optional[jax.Array] = None,
                          broadcast_dropout: bool = False,
                          kernel: Optional[str] = None) -> jax.Array:
    """softmax(q kᵀ / sqrt(K)) v (B, L, H, V), masked, dropout on the probabilities.

    Args:
      q_BLHK, k_BSHK, v_BSHV: queries, keys, values.
      mask: who attends to whom; None attends everywhere.
      dropout_rate, dropout_key: attention-probability dropout (rate 0 for none).
      broadcast_dropout: one (L, S) dropout mask shared by every example and head.
      kernel: one of KERNELS; by backend and inputs (`choose_kernel`) when None.
    """
    (_, L, _, K), S, V = q_BLHK.shape, k_BSHK.shape[1], v_BSHV.shape[-1]
    if kernel is None:
        kernel, why = choose_kernel(jax.default_backend(), q_BLHK.dtype, K, V, L, S, mask,
                                    dropout_rate > 0)
        if why:
            _log_fallback(why)
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    mask = mask or AttentionMask()
    blocked = functools.partial(
        flash_attention, masks=Masks(mask.key_BS, mask.segment_ids_BL, mask.segment_ids_BL,
                                     mask.positions_BL),
        causal=mask.causal, dropout_rate=dropout_rate, dropout_key=dropout_key,
        broadcast_dropout=broadcast_dropout)
    if kernel == "cudnn":
        return jax_attention(q_BLHK, k_BSHK, v_BSHV, mask, implementation="cudnn",
                             otherwise=blocked)
    if kernel == "splash":
        return splash_attention(q_BLHK, k_BSHK, v_BSHV, mask)
    return blocked(q_BLHK, k_BSHK, v_BSHV)


def jax_attention(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
                  mask: AttentionMask, *, implementation: str, otherwise) -> jax.Array:
    """`jax.nn.dot_product_attention` of `implementation` ("cudnn"; "xla" tests the same
    arguments on CPU). Key padding goes in as per-row key counts, which means right padding:
    a batch whose key mask is not right padding (checked on the device) runs
    `otherwise(q, k, v)` instead."""
    B, S = k_BSHK.shape[:2]

    def fused(q, k, v, lengths_B=None):
        return jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal,
                                            key_value_seq_lengths=lengths_B,
                                            implementation=implementation)

    if mask.key_BS is None:
        return fused(q_BLHK, k_BSHK, v_BSHV)
    keys_BS = jnp.broadcast_to(mask.key_BS, (B, S))
    lengths_B = jnp.sum(keys_BS, axis=1, dtype=jnp.int32)
    right_padded = jnp.all(keys_BS == (jnp.arange(S)[None, :] < lengths_B[:, None]))
    return jax.lax.cond(right_padded, lambda *a: fused(*a, lengths_B), otherwise,
                        q_BLHK, k_BSHK, v_BSHV)


def splash_attention(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
                     mask: AttentionMask, *, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret` runs it anywhere, slowly, for tests)."""
    (B, L, H, K), S = q_BLHK.shape, k_BSHK.shape[1]
    one = splash_mask.CausalMask((L, S)) if mask.causal else splash_mask.FullMask((L, S))
    kernel = splash.make_splash_mha_single_device(splash_mask.MultiHeadMask([one] * H),
                                                  interpret=interpret)
    seg = mask.segment_ids_BL
    if mask.key_BS is not None:  # pads: a segment of their own, so no row is empty
        keys = jnp.broadcast_to(mask.key_BS, (B, S))
        seg = jnp.where(keys, 1 if seg is None else seg, -1)
    scale = 1.0 / np.sqrt(K)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)

    def one_row(q_HLK, k_HSK, v_HSV, seg_L):
        ids = None if seg_L is None else splash.SegmentIds(q=seg_L, kv=seg_L)
        return kernel(q_HLK, k_HSK, v_HSV, segment_ids=ids)

    q = heads_first(q_BLHK * jnp.asarray(scale, q_BLHK.dtype))
    o_BHLV = jax.vmap(one_row)(q, heads_first(k_BSHK), heads_first(v_BSHV),
                               None if seg is None else seg.astype(jnp.int32))
    return jnp.swapaxes(o_BHLV, 1, 2)


class SelfAttention(nnx.Module):
    """Multi-head self-attention: softmax(q kᵀ / sqrt(K)) v, then an output projection."""

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        qk_head_dim: Optional[int] = None,
        v_head_dim: Optional[int] = None,
        dropout: float = 0.0,
        broadcast_dropout: bool = False,
        init_std: float = 0.02,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """`dropout` applies to the attention probabilities, a fresh mask per element; with
        `broadcast_dropout`, one (L, S) mask is shared by every example and head (Flax's
        `broadcast_dropout`, which HF's Flax models use): B·H times fewer random bits, and a
        weaker regularizer."""
        if qk_head_dim is None or v_head_dim is None:
            if features % num_heads:
                raise ValueError(
                    f"hidden size {features} is not divisible by num_heads {num_heads}; "
                    "set qk_head_dim and v_head_dim explicitly or change num_heads")
        self.num_heads = num_heads
        self.qk_head_dim = qk_head_dim or features // num_heads
        self.v_head_dim = v_head_dim or features // num_heads
        hk, hv = num_heads * self.qk_head_dim, num_heads * self.v_head_dim
        kw = dict(rngs=rngs, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
        self.query = dense(features, hk, ("embed", "heads"), **kw)
        self.key = dense(features, hk, ("embed", "heads"), **kw)
        self.value = dense(features, hv, ("embed", "heads"), **kw)
        self.out = dense(hv, features, ("heads", "embed"), **kw)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(0, 1) if broadcast_dropout else ())

    def __call__(
        self,
        x_BLD: jax.Array,
        mask: Optional[AttentionMask] = None,
        *,
        deterministic: bool = True,
        rngs: Optional[nnx.Rngs] = None,
    ) -> jax.Array:
        """Args: x_BLD input; mask from `make_attention_mask`."""
        B, L, _ = x_BLD.shape
        H, K, V = self.num_heads, self.qk_head_dim, self.v_head_dim
        q_BLHK = self.query(x_BLD).reshape(B, L, H, K)
        k_BSHK = self.key(x_BLD).reshape(B, L, H, K)
        v_BSHV = self.value(x_BLD).reshape(B, L, H, V)
        rate, key = 0.0, None
        if not deterministic and self.dropout.rate > 0:
            if rngs is None:
                raise ValueError("attention dropout needs rngs with a 'dropout' stream; pass "
                                 "rngs= or call with deterministic=True")
            rate, key = self.dropout.rate, rngs[self.dropout.rng_collection]()
        o_BLHV = dot_product_attention(q_BLHK, k_BSHK, v_BSHV, mask, dropout_rate=rate,
                                       dropout_key=key,
                                       broadcast_dropout=bool(self.dropout.broadcast_dims))
        return self.out(o_BLHV.reshape(B, L, H * V))

    def decode(self, x_BLD: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
               pos_BL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Causal attention of L new tokens against a preallocated key/value cache (decoding).

        Row b's token l sits at position `pos_BL[b, l]`: its key and value are written there
        (positions past the cache end are dropped) and it attends to every cached position
        ≤ its own. Whatever a cache holds beyond a row's position (pads of a right-padded
        prompt, stale entries) is never read before it is overwritten.

        Args:
          x_BLD: inputs of the new tokens.
          k_BSHK, v_BSHV: the cache (S positions), in the compute dtype.
          pos_BL: int positions of the new tokens.

        Returns:
          (output (B, L, D), updated k cache, updated v cache).
        """
        B, L, _ = x_BLD.shape
        H, K, V = self.num_heads, self.qk_head_dim, self.v_head_dim
        q_BLHK = self.query(x_BLD).reshape(B, L, H, K)
        rows_B1 = jnp.arange(B)[:, None]
        k_BSHK = k_BSHK.at[rows_B1, pos_BL].set(
            self.key(x_BLD).reshape(B, L, H, K).astype(k_BSHK.dtype), mode="drop")
        v_BSHV = v_BSHV.at[rows_B1, pos_BL].set(
            self.value(x_BLD).reshape(B, L, H, V).astype(v_BSHV.dtype), mode="drop")
        mask = AttentionMask(positions_BL=pos_BL, causal=True)
        o_BLHV = dot_product_attention(q_BLHK, k_BSHK, v_BSHV, mask)
        return self.out(o_BLHV.reshape(B, L, H * V)), k_BSHK, v_BSHV
