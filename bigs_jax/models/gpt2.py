"""GPT-2: a decoder-only causal language model.

Radford et al., "Language Models are Unsupervised Multitask Learners" (OpenAI, 2019).

The layout is HF `GPT2LMHeadModel`'s, so converted checkpoints give the same logits: learned
absolute positions added to the token embeddings, `num_layers` pre-LayerNorm blocks
(x + Attn(LN(x)), then x + MLP(LN(x))) with causal self-attention scaled by 1/sqrt(head dim)
and a tanh-GELU ("gelu_new") feed-forward of width 4·D unless set, a final LayerNorm, and an
LM head tied to the token embeddings (or an untied bias-free projection). The residual output
projections start from normal(init_std / sqrt(2·num_layers)), the paper's scaled init.

Parameter paths match the encoder's stack block where the pieces are the same
(`embeddings/word`, `layers/<i>/mixer/{query,key,value,out}`, `layers/<i>/mlp/{up,down}`), so
freeze specs and growth transforms written for BERT read GPT-2 too.

Dimension key: B batch, L length, D model, F mlp, C vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.attention import SelfAttention, make_attention_mask
from bigs_jax.layers.blocks import check_remat, run_layers
from bigs_jax.layers.embeddings import check_token_ids, embed, mask_pad_logits, padded_vocab
from bigs_jax.layers.linear import activation, dense, layer_norm, rms_norm
from bigs_jax.layers.mlp import MLP
from bigs_jax.models.outputs import (ModelOutput, check_dtype_policy, ids_or_embeds,
                                     with_output_dtype)

NORMS = ("layer", "rms")


def _norm(c: "GPT2Config", dt):
    """The config's normalization layer over hidden_size (LayerNorm, or RMSNorm)."""
    make = layer_norm if c.norm == "layer" else rms_norm
    return make(c.hidden_size, eps=c.norm_eps, rngs=None, dtype=dt)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of GPT-2. HF `GPT2Config` names in comments."""

    vocab_size: int = 50257
    vocab_multiple: int = 1                  # pad the word table, head and logits to a multiple
    max_len: int = 1024                      # n_positions
    hidden_size: int = 768                   # n_embd
    num_layers: int = 12                     # n_layer
    num_heads: int = 12                      # n_head
    qk_head_dim: Optional[int] = None        # None: hidden_size // num_heads (HF GPT-2)
    v_head_dim: Optional[int] = None         # None: hidden_size // num_heads
    intermediate_size: Optional[int] = None  # n_inner; None means 4 * hidden_size
    hidden_act: str = "gelu_new"             # activation_function (tanh GELU)
    norm_eps: float = 1e-5                   # layer_norm_epsilon
    norm: str = "layer"                      # layer (GPT-2) | rms (RMSNorm, no bias)
    dropout: float = 0.1                     # embd_pdrop and resid_pdrop
    attention_dropout: float = 0.1           # attn_pdrop
    attention_dropout_broadcast: bool = False  # one (L, L) mask for all examples and heads
    init_std: float = 0.02                   # initializer_range
    tie_word_embeddings: bool = True
    # dtype policy (outputs.DTYPES): parameter storage, compute, logits
    param_dtype: str = "float32"
    dtype: str = "float32"
    output_dtype: str = "float32"
    remat: str = "none"                      # per-layer rematerialization, see blocks.REMAT
    scan_layers: bool = False                # one jax.lax.scan over the blocks (blocks.run_layers)

    def __post_init__(self):
        check_dtype_policy(self)
        check_remat(self.remat)
        activation(self.hidden_act)
        padded_vocab(self.vocab_size, self.vocab_multiple)
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if (self.qk_head_dim is None or self.v_head_dim is None) and \
                self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}; pick sizes with hidden_size % num_heads == 0 or set "
                             "qk_head_dim and v_head_dim")

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


class Embeddings(nnx.Module):
    """E = Dropout(word[ids] + position[t]); GPT-2 has no LayerNorm here."""

    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        kw = dict(init_std=c.init_std, rngs=rngs, dtype=jnp.dtype(c.dtype))
        self.word = embed(padded_vocab(c.vocab_size, c.vocab_multiple), c.hidden_size,
                          ("vocab", "embed"), **kw)
        self.position = embed(c.max_len, c.hidden_size, (None, "embed"), **kw)
        self.dropout = nnx.Dropout(c.dropout)
        self.max_len = c.max_len

    def __call__(self, x_BLD: jax.Array, *, deterministic: bool = True,
                 rngs: Optional[nnx.Rngs] = None,
                 positions_BL: Optional[jax.Array] = None) -> jax.Array:
        """Add positions (0..L-1, or per-segment `positions_BL`) to token embeddings `x_BLD`."""
        L = x_BLD.shape[1]
        if L > self.max_len:
            raise ValueError(f"input length {L} exceeds the model's max_len {self.max_len}; "
                             "truncate the input or build the model with a larger max_len")
        if positions_BL is None:
            positions_BL = jnp.arange(L)[None, :]
        x_BLD = x_BLD + self.position(positions_BL)
        return self.dropout(x_BLD, deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN transformer decoder layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c: GPT2Config, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        residual_std = c.init_std / math.sqrt(2 * c.num_layers)
        self.mixer_norm = _norm(c, dt)
        self.mixer = SelfAttention(d, c.num_heads, qk_head_dim=c.qk_head_dim,
                                   v_head_dim=c.v_head_dim, dropout=c.attention_dropout,
                                   broadcast_dropout=c.attention_dropout_broadcast,
                                   init_std=c.init_std, dtype=dt, rngs=rngs)
        hv = c.num_heads * self.mixer.v_head_dim
        self.mixer.out = dense(hv, d, ("heads", "embed"), rngs=rngs, init_std=residual_std,
                               dtype=dt)
        self.mlp_norm = _norm(c, dt)
        self.mlp = MLP(d, c.mlp_size, act=c.hidden_act, dropout=c.dropout,
                       init_std=c.init_std, dtype=dt, rngs=rngs)
        self.mlp.down = dense(c.mlp_size, d, ("mlp", "embed"), rngs=rngs,
                              init_std=residual_std, dtype=dt)
        self.dropout = nnx.Dropout(c.dropout)

    def __call__(self, x_BLD, attn_mask, *, deterministic=True, rngs=None):
        kw = dict(deterministic=deterministic, rngs=rngs)
        h_BLD = self.mixer(self.mixer_norm(x_BLD), attn_mask, **kw)
        x_BLD = x_BLD + self.dropout(h_BLD, **kw)
        return x_BLD + self.mlp(self.mlp_norm(x_BLD), **kw)

    def decode(self, x_BLD, cache: dict, pos_BL):
        """`__call__` without dropout for new tokens at `pos_BL`, attending through the
        key/value `cache` ({"k", "v"}); returns (output, updated cache)."""
        h_BLD, k_BSHK, v_BSHV = self.mixer.decode(self.mixer_norm(x_BLD), cache["k"],
                                                  cache["v"], pos_BL)
        x_BLD = x_BLD + h_BLD
        return x_BLD + self.mlp(self.mlp_norm(x_BLD)), {"k": k_BSHK, "v": v_BSHV}


class GPT2(nnx.Module):
    """Embeddings → `num_layers` pre-LN blocks → final LayerNorm → LM head."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = jnp.dtype(c.dtype)
        self.embeddings = Embeddings(c, rngs=rngs)
        self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = _norm(c, dt)
        self.lm_head = nnx.data(None if c.tie_word_embeddings else dense(
            c.hidden_size, padded_vocab(c.vocab_size, c.vocab_multiple), ("embed", "vocab"),
            rngs=rngs, init_std=c.init_std,
            use_bias=False, dtype=dt))

    @with_output_dtype
    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
        *,
        inputs_embeds: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        deterministic: bool = True,
        rngs: Optional[nnx.Rngs] = None,
    ) -> ModelOutput:
        """Next-token logits of a right-padded batch.

        Args:
          input_ids: (B, L) int token ids.
          attention_mask: (B, L), 1 for real tokens and 0 for pads; positions stay 0..L-1.
          inputs_embeds: (B, L, D) token embeddings to use instead of `input_ids` (frozen
            backbones with input adapters; gradient tests).
          segment_ids: (B, L) packed rows: tokens attend only within their segment (1, 2, ...;
            0 on pads).
          positions: (B, L) position ids restarting in each segment; 0..L-1 if None.
          deterministic: disable dropout.
          rngs: dropout randomness when not deterministic.

        Returns:
          ModelOutput with hidden_states (B, L, D) after the final LayerNorm and fp32
          logits (B, L, C).
        """
        ids_BL, embeds_BLD = ids_or_embeds(input_ids, inputs_embeds,
                                           attention_mask=attention_mask,
                                           segment_ids=segment_ids, positions=positions)
        kw = dict(deterministic=deterministic, rngs=rngs)
        if embeds_BLD is None:
            check_token_ids(ids_BL, self.config.vocab_size)
            x_BLD = self.embeddings.word(ids_BL)
        else:
            x_BLD = embeds_BLD
        x_BLD = self.embeddings(x_BLD, positions_BL=None if positions is None
                                else jnp.asarray(positions), **kw)
        mask_BL = None if attention_mask is None else jnp.asarray(attention_mask)
        attn_mask = make_attention_mask(
            mask_BL, x_BLD.shape[1], causal=True,
            segment_ids_BL=None if segment_ids is None else jnp.asarray(segment_ids))
        x_BLD = run_layers(self.layers, x_BLD, attn_mask, rngs=rngs, remat=self.config.remat,
                           deterministic=deterministic, scan=self.config.scan_layers)
        h_BLD = self.final_norm(x_BLD)
        return ModelOutput(hidden_states=h_BLD, logits=self.logits(h_BLD))

    # ------------------------------------------------------------ decoding (bigs_jax.generation)
    # Incremental decoding with a preallocated key/value cache: a prompt (prefill) or one new
    # token per row (step) runs through the blocks, each writing its keys and values at the
    # tokens' positions and attending to the cached positions before them. A step costs
    # O(D² + S·D) per layer and token (S the cache length) instead of the O(L·D² + L²·D) of a
    # forward over the whole prefix.

    def init_cache(self, batch: int, length: int) -> list[dict]:
        """Zero key/value caches of `length` positions, one {"k", "v"} per layer."""
        c, att = self.config, self.layers[0].mixer
        shape = (batch, length, c.num_heads)
        dt = jnp.dtype(c.dtype)
        return [{"k": jnp.zeros((*shape, att.qk_head_dim), dt),
                 "v": jnp.zeros((*shape, att.v_head_dim), dt)} for _ in self.layers]

    def decode_constants(self, length: int) -> None:
        """What every decode step reuses (nothing for attention; see `M2.decode_constants`)."""
        del length

    def _decode_hidden(self, ids_BL, pos_BL, cache):
        x_BLD = self.embeddings.word(ids_BL)
        # Rows that have stopped may point past the table; their outputs are never read.
        x_BLD = self.embeddings(x_BLD, positions_BL=jnp.minimum(pos_BL, self.config.max_len - 1))
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x_BLD, layer_cache = layer.decode(x_BLD, layer_cache, pos_BL)
            new_cache.append(layer_cache)
        return self.final_norm(x_BLD), new_cache

    def prefill(self, ids_BL: jax.Array, lengths_B: jax.Array, cache: list[dict]):
        """Run right-padded prompts (row b's tokens at 0..lengths_B[b]-1) into the cache;
        returns (fp32 next-token logits (B, C) after each prompt's last token, cache)."""
        B, L = ids_BL.shape
        pos_BL = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L))
        h_BLD, cache = self._decode_hidden(ids_BL, pos_BL, cache)
        h_B1D = h_BLD[jnp.arange(B), lengths_B - 1][:, None, :]
        return self.logits(h_B1D)[:, 0], cache

    def decode_step(self, ids_B: jax.Array, pos_B: jax.Array, cache: list[dict], consts=None):
        """One new token per row at position `pos_B`; returns (fp32 next-token logits (B, C),
        cache)."""
        del consts
        h_B1D, cache = self._decode_hidden(ids_B[:, None], pos_B[:, None], cache)
        return self.logits(h_B1D)[:, 0], cache

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        """fp32 LM logits (B, L, C) of final hidden states, whatever the compute dtype
        (the output dtype policy casts them afterwards); a padded vocabulary's pad rows get
        PAD_LOGIT."""
        fp32 = jnp.promote_types(h_BLD.dtype, "float32")
        if self.lm_head is None:
            w_CD = self.embeddings.word.embedding[...]
            logits_BLC = jnp.einsum("BLD,CD->BLC", h_BLD, w_CD.astype(h_BLD.dtype),
                                    preferred_element_type=fp32)
        else:
            w_DC = self.lm_head.kernel[...]
            logits_BLC = jnp.einsum("BLD,DC->BLC", h_BLD, w_DC.astype(h_BLD.dtype),
                                    preferred_element_type=fp32)
        return mask_pad_logits(logits_BLC, self.config.vocab_size)


# ---------------------------------------------------------------------------- registry

FAMILY = "gpt2"
Config = GPT2Config
Model = GPT2

# The four OpenAI sizes (HF hub gpt2, gpt2-medium, gpt2-large, gpt2-xl), and two CPU sizes
# for tests, smoke configs and laptops.
SIZES: dict[str, dict] = {
    "gpt2": dict(hidden_size=768, num_layers=12, num_heads=12),
    "gpt2-medium": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "gpt2-large": dict(hidden_size=1280, num_layers=36, num_heads=20),
    "gpt2-xl": dict(hidden_size=1600, num_layers=48, num_heads=25),
    "gpt2-tiny": dict(hidden_size=64, num_layers=2, num_heads=2, max_len=128),
    "gpt2-mini": dict(hidden_size=256, num_layers=4, num_heads=4, max_len=256),
    # A pre-RMSNorm GPT-2 (the norm of the function-preserving growth paper, arXiv 2308.06103).
    "gpt2-rms-tiny": dict(hidden_size=64, num_layers=2, num_heads=2, max_len=128, norm="rms",
                          norm_eps=1e-6),
}
