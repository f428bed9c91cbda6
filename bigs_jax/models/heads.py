"""Task heads shared by the encoders: MLM (tied decoder), pooler, sequence classification.

Dimension key: B batch, L length, P predicted positions, D model, C vocab, Y labels.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.embeddings import mask_pad_logits, padded_vocab
from bigs_jax.layers.linear import Dtype, dense, gelu_exact, layer_norm, sharded

POOLERS = ("cls", "mean", "non_padding_mean")


class MLMHead(nnx.Module):
    """Dense → exact GELU → LayerNorm → tied decoder (word embeddingᵀ) + bias; the logits of
    a padded vocabulary's pad rows are PAD_LOGIT."""

    def __init__(self, features: int, vocab_size: int, *, norm_eps: float,
                 init_std: Optional[float], dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, vocab_multiple: int = 1, rngs: nnx.Rngs):
        self.transform = dense(features, features, ("embed", None), rngs=rngs,
                               init_std=init_std, dtype=dtype, param_dtype=param_dtype)
        self.norm = layer_norm(features, eps=norm_eps, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((padded_vocab(vocab_size, vocab_multiple),),
                                        param_dtype), **sharded(("vocab",)))
        self.vocab_size = vocab_size

    def __call__(self, h_BPD: jax.Array, embedding_CD: jax.Array) -> jax.Array:
        h_BPD = self.norm(gelu_exact(self.transform(h_BPD)))
        # Logits and the loss stay in fp32 whatever the compute dtype.
        logits_BPC = jnp.einsum("BPD,CD->BPC", h_BPD, embedding_CD.astype(h_BPD.dtype),
                                preferred_element_type=jnp.promote_types(h_BPD.dtype,
                                                                         "float32"))
        logits_BPC = logits_BPC + self.bias[...].astype(logits_BPC.dtype)[None, None, :]
        return mask_pad_logits(logits_BPC, self.vocab_size)


def pool(h_BLD: jax.Array, mask_BL: Optional[jax.Array], kind: str) -> jax.Array:
    """Reduce (B, L, D) to (B, D): first token, mean over all L, or mean over real tokens.

    `mean` averages pads too; that is what the official BiGS_128 checkpoint does.
    """
    if kind == "cls":
        return h_BLD[:, 0]
    if kind == "mean" or mask_BL is None:
        return h_BLD.mean(axis=1)
    if kind == "non_padding_mean":
        w_BL1 = mask_BL.astype(h_BLD.dtype)[..., None]
        return (h_BLD * w_BL1).sum(1) / jnp.maximum(w_BL1.sum(1), 1)
    raise ValueError(f"unknown pooler {kind!r}; choose one of {POOLERS}")


class ClassificationHead(nnx.Module):
    """pool → Dense → tanh (the pooler) → dropout → Dense(num_labels)."""

    def __init__(self, features: int, num_labels: int, *, pooler: str, dropout: float,
                 init_std: float, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose one of {POOLERS}")
        kw = dict(rngs=rngs, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
        self.pooler_type = pooler
        self.pooler = dense(features, features, ("embed", None), **kw)
        self.classifier = dense(features, num_labels, ("embed", None), **kw)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, h_BLD: jax.Array, mask_BL: Optional[jax.Array], *,
                 deterministic: bool = True, rngs: Optional[nnx.Rngs] = None):
        pooled_BD = jnp.tanh(self.pooler(pool(h_BLD, mask_BL, self.pooler_type)))
        x_BD = self.dropout(pooled_BD, deterministic=deterministic, rngs=rngs)
        logits_BY = self.classifier(x_BD)
        return logits_BY.astype(jnp.promote_types(logits_BY.dtype, "float32")), pooled_BD
