"""Multi-head self-attention with independent q/k and v head sizes.

Vaswani et al. 2017 (arXiv 1706.03762). The q/k head dim K and the v head dim V are separate
settings, so attention variants with narrow keys (or the BiGS paper's gated-attention ablation)
need no special class. Softmax runs in fp32 whatever the compute dtype.

Dimension key: B batch, L query length, S key length, D model, H heads, K q/k head dim,
V v head dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.linear import Dtype, dense


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
        logits_BHLS = jnp.einsum("BLHK,BSHK->BHLS", q_BLHK, k_BSHK,
                                 preferred_element_type=jnp.float32) / jnp.sqrt(K).astype(
                                     jnp.float32)
        if mask is not None:
            logits_BHLS = jnp.where(mask, logits_BHLS, jnp.finfo(jnp.float32).min)
        probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1)
        probs_BHLS = self.dropout(probs_BHLS, deterministic=deterministic, rngs=rngs)
        o_BLHV = jnp.einsum("BHLS,BSHV->BLHV", probs_BHLS.astype(v_BSHV.dtype), v_BSHV)
        return self.out(o_BLHV.reshape(B, L, H * V))
