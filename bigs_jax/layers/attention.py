"""Multi-head self-attention with independent q/k and v head sizes.

Vaswani et al. 2017 (arXiv 1706.03762). The q/k head dim K and the v head dim V are separate
settings, so attention variants with narrow keys (or the BiGS paper's gated-attention ablation)
need no special class. Softmax runs in fp32 whatever the compute dtype.

Without dropout on the probabilities (evaluation, inference), long inputs are attended in
blocks of queries: each block's (H, L_block, S) scores stay within `SCORE_BLOCK_FLOATS`, so
the softmax's passes run in cache instead of streaming a full (H, L, S) matrix through memory
(at L = 4096 in BERT-base that matrix is 805 MB per layer). Every query row still sees all S
keys, so the result is the unblocked one up to float reassociation in the matmuls.

Dimension key: B batch, L query length, S key length, D model, H heads, K q/k head dim,
V v head dim, N query blocks, T queries per block.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.linear import Dtype, dense

# Scores (floats) of one query block in the blocked path: 2**23 floats = 32 MB. On the 2-core
# CPU VM (32 MB L3) a 2-layer BERT-base forward at L = 4096 took 3.7-4.5 s with this size,
# 4.8-6.0 s with 8 or 16 MB blocks and 8.4 s unblocked.
SCORE_BLOCK_FLOATS = 1 << 23


def make_attention_mask(
    mask_BL: Optional[jax.Array],
    L: int,
    *,
    causal: bool = False,
    segment_ids_BL: Optional[jax.Array] = None,
) -> Optional[jax.Array]:
    """Boolean (B|1, 1, L, L) mask, True where query t may attend to key s.

    Padding masks keys only: a pad query still attends (to real keys), which keeps its row
    finite; its output is never read.
    """
    mask = None
    if mask_BL is not None:
        mask = mask_BL.astype(bool)[:, None, None, :]
    if segment_ids_BL is not None:
        same = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
        mask = same if mask is None else mask & same
    if causal:
        tri = jnp.tril(jnp.ones((L, L), bool))[None, None]
        mask = tri if mask is None else mask & tri
    return mask


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
        mask: Optional[jax.Array] = None,
        *,
        deterministic: bool = True,
        rngs: Optional[nnx.Rngs] = None,
    ) -> jax.Array:
        """Args: x_BLD input; mask from `make_attention_mask` (True = may attend)."""
        B, L, _ = x_BLD.shape
        H, K, V = self.num_heads, self.qk_head_dim, self.v_head_dim
        q_BLHK = self.query(x_BLD).reshape(B, L, H, K)
        k_BSHK = self.key(x_BLD).reshape(B, L, H, K)
        v_BSHV = self.value(x_BLD).reshape(B, L, H, V)
        if deterministic or self.dropout.rate == 0:
            o_BLHV = attend_in_query_blocks(q_BLHK, k_BSHK, v_BSHV, mask)
        else:
            probs_BHLS = attention_probs(q_BLHK, k_BSHK, mask)
            probs_BHLS = self.dropout(probs_BHLS, deterministic=deterministic, rngs=rngs)
            o_BLHV = jnp.einsum("BHLS,BSHV->BLHV", probs_BHLS.astype(v_BSHV.dtype), v_BSHV)
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
        S = k_BSHK.shape[1]
        q_BLHK = self.query(x_BLD).reshape(B, L, H, K)
        rows_B1 = jnp.arange(B)[:, None]
        k_BSHK = k_BSHK.at[rows_B1, pos_BL].set(
            self.key(x_BLD).reshape(B, L, H, K).astype(k_BSHK.dtype), mode="drop")
        v_BSHV = v_BSHV.at[rows_B1, pos_BL].set(
            self.value(x_BLD).reshape(B, L, H, V).astype(v_BSHV.dtype), mode="drop")
        mask_B1LS = (jnp.arange(S)[None, None, None, :] <= pos_BL[:, None, :, None])
        o_BLHV = attend_in_query_blocks(q_BLHK, k_BSHK, v_BSHV, mask_B1LS)
        return self.out(o_BLHV.reshape(B, L, H * V)), k_BSHK, v_BSHV


def attention_probs(q_BLHK: jax.Array, k_BSHK: jax.Array,
                    mask: Optional[jax.Array]) -> jax.Array:
    """fp32 softmax(q kᵀ / sqrt(K)) (B, H, L, S), zero where `mask` is False."""
    acc = jnp.promote_types(q_BLHK.dtype, jnp.float32)  # float64 stays float64 (tests)
    logits_BHLS = jnp.einsum("BLHK,BSHK->BHLS", q_BLHK, k_BSHK, preferred_element_type=acc)
    logits_BHLS = logits_BHLS / jnp.sqrt(q_BLHK.shape[-1]).astype(acc)
    if mask is not None:
        logits_BHLS = jnp.where(mask, logits_BHLS, jnp.finfo(acc).min)
    return jax.nn.softmax(logits_BHLS, axis=-1)


def query_block_size(B: int, H: int, L: int, S: int) -> int:
    """Queries per block: the largest power-of-two divisor of L whose (B, H, T, S) scores fit
    in `SCORE_BLOCK_FLOATS`; L itself when all the scores fit (one block, no loop)."""
    if B * H * L * S <= SCORE_BLOCK_FLOATS:
        return L
    T = L & -L  # the largest power of two dividing L
    while T > 1 and B * H * T * S > SCORE_BLOCK_FLOATS:
        T //= 2
    return T


def attend_in_query_blocks(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
                           mask: Optional[jax.Array]) -> jax.Array:
    """softmax(q kᵀ / sqrt(K)) v (B, L, H, V) without dropout, one block of queries at a time
    (see the module docstring); a single block is the plain computation."""
    B, L, H, _ = q_BLHK.shape
    S = k_BSHK.shape[1]

    def attend(q_BTHK, mask_T):
        probs_BHTS = attention_probs(q_BTHK, k_BSHK, mask_T)
        return jnp.einsum("BHTS,BSHV->BTHV", probs_BHTS.astype(v_BSHV.dtype), v_BSHV)

    T = query_block_size(B, H, L, S)
    if T == L:
        return attend(q_BLHK, mask)
    N = L // T
    q_NBTHK = jnp.moveaxis(q_BLHK.reshape(B, N, T, *q_BLHK.shape[2:]), 1, 0)
    if mask is None or mask.shape[2] == 1:  # no mask, or one that is the same for every query
        o_NBTHV = jax.lax.map(lambda q: attend(q, mask), q_NBTHK)
    else:
        m = mask.reshape(mask.shape[0], mask.shape[1], N, T, mask.shape[3])
        o_NBTHV = jax.lax.map(lambda xs: attend(*xs), (q_NBTHK, jnp.moveaxis(m, 2, 0)))
    return jnp.moveaxis(o_NBTHV, 0, 1).reshape(B, L, H, v_BSHV.shape[-1])
