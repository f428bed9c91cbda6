"""BERT-style input embeddings: word + absolute position + token type, LayerNorm, dropout.

Devlin et al. 2018 (arXiv 1810.04805). BiGS and M2-BERT reuse them unchanged.

Dimension key: B batch, L length, D model, C vocab.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigs_jax.layers.linear import Dtype, layer_norm, sharded


def check_token_ids(ids, vocab_size: int) -> None:
    """ValueError if concrete `ids` fall outside [0, vocab_size): an embedding lookup would
    clamp or fill them with NaN instead of failing. Traced ids (under jit) and arrays spread
    over other hosts pass unchecked, so a compiled step pays nothing; the train loop checks
    every host batch before it reaches the step (data.registry.check_token_ids)."""
    check_index_range(ids, vocab_size, "input_ids", "the vocabulary", "the model's vocab_size",
                      "tokenize with the model's vocabulary")


def check_index_range(ids, size: int, name: str, table: str, what: str, fix: str) -> None:
    """ValueError if concrete integer `ids` [batch, length] fall outside [0, size), naming
    `name`, the `table` they index, what `size` is and the `fix`; traced or non-addressable
    arrays pass (see `check_token_ids`)."""
    if isinstance(ids, jax.core.Tracer) or (
            isinstance(ids, jax.Array) and not ids.is_fully_addressable):
        return
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        kind = "token ids" if name == "input_ids" else "ids"
        raise ValueError(f"{name} must be integer {kind} of shape [batch, length], got "
                         f"{ids.dtype} of shape {ids.shape}; pass e.g. ids[None] for one row")
    bad = ids[(ids < 0) | (ids >= size)]
    if bad.size:
        raise ValueError(f"{name} hold {bad.size} ids outside {table}, in "
                         f"[{bad.min()}, {bad.max()}]; {what} is {size} (ids 0..{size - 1}); "
                         f"{fix}")


# The logit of a padding row of the vocabulary (`padded_vocab`): exp(PAD_LOGIT - max) is 0 in
# fp32, so pads take no probability in softmax, loss, argmax or sampling; finite, so log-softmax
# and entropy stay finite too.
PAD_LOGIT = -1e9


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (the rows of the embedding table)."""
    if int(multiple) < 1:
        raise ValueError(f"vocab_multiple must be >= 1, got {multiple}; use 1 for no padding "
                         "or e.g. 128 so the vocabulary splits over the tensor axis")
    return -(-int(vocab_size) // int(multiple)) * int(multiple)


def mask_pad_logits(logits_C: jax.Array, vocab_size: int) -> jax.Array:
    """`logits_C` (vocabulary last, possibly padded) with entries of ids >= vocab_size set to
    PAD_LOGIT; unchanged when there is no padding."""
    if logits_C.shape[-1] == vocab_size:
        return logits_C
    ids = jax.lax.broadcasted_iota(jnp.int32, logits_C.shape, logits_C.ndim - 1)
    return jnp.where(ids < vocab_size, logits_C, jnp.asarray(PAD_LOGIT, logits_C.dtype))


def embed(num: int, features: int, axes, *, init_std: float, rngs: nnx.Rngs,
          dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32) -> nnx.Embed:
    """An `nnx.Embed` with a normal(init_std) table named `axes`."""
    return nnx.Embed(num, features, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=jax.nn.initializers.normal(init_std), rngs=rngs,
                     embedding_metadata=sharded(axes))


class BertEmbeddings(nnx.Module):
    """E = Dropout(LN(word[ids] + position[t] + token_type[tt]))."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        type_vocab_size: int,
        features: int,
        *,
        norm_eps: float = 1e-12,
        dropout: float = 0.1,
        init_std: float = 0.02,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        learned_positions: bool = True,
        vocab_multiple: int = 1,
        rngs: nnx.Rngs,
    ):
        """`learned_positions=False` drops the position table (models whose mixer carries
        position, e.g. M2 with `use_positional_encodings: False`); max_len is still enforced.
        The word table has `padded_vocab(vocab_size, vocab_multiple)` rows; ids stay below
        `vocab_size`."""
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.word = embed(padded_vocab(vocab_size, vocab_multiple), features, ("vocab", "embed"),
                          **kw)
        self.vocab_size = vocab_size
        self.position = nnx.data(embed(max_len, features, (None, "embed"), **kw)
                                 if learned_positions else None)
        self.token_type = (embed(type_vocab_size, features, (None, "embed"), **kw)
                           if type_vocab_size else None)
        self.norm = layer_norm(features, eps=norm_eps, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)
        self.dropout = nnx.Dropout(dropout)
        self.max_len = max_len

    def __call__(
        self,
        ids_BL: jax.Array,
        token_type_ids_BL: Optional[jax.Array] = None,
        position_ids_BL: Optional[jax.Array] = None,
        *,
        deterministic: bool = True,
        rngs: Optional[nnx.Rngs] = None,
        inputs_embeds_BLD: Optional[jax.Array] = None,
    ) -> jax.Array:
        """`inputs_embeds_BLD` replaces word[ids] (frozen backbones fed by an input adapter,
        as in FPT); `ids_BL` is then ignored."""
        if inputs_embeds_BLD is None:
            check_token_ids(ids_BL, self.vocab_size)
        L = (ids_BL if inputs_embeds_BLD is None else inputs_embeds_BLD).shape[1]
        if L > self.max_len:
            raise ValueError(f"input length {L} exceeds the model's max_len {self.max_len}; "
                             "truncate the input or build the model with a larger max_len")
        x_BLD = self.word(ids_BL) if inputs_embeds_BLD is None else inputs_embeds_BLD
        if self.position is not None:
            if position_ids_BL is None:
                position_ids_BL = jnp.arange(L)[None, :]
            x_BLD = x_BLD + self.position(position_ids_BL)
        if self.token_type is not None:
            if token_type_ids_BL is None:
                token_type_ids_BL = jnp.zeros(x_BLD.shape[:2], jnp.int32)
            check_index_range(token_type_ids_BL, self.token_type.num_embeddings,
                              "token_type_ids", "the token types", "the model's type_vocab_size",
                              "use 0 for the first segment and 1 for the second")
            x_BLD = x_BLD + self.token_type(token_type_ids_BL)
        x_BLD = self.norm(x_BLD)
        return self.dropout(x_BLD, deterministic=deterministic, rngs=rngs)
