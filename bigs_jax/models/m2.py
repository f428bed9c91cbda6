"""Monarch Mixer: M2-BERT (bidirectional encoder) and M2-GPT (causal LM).

Fu et al., "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", NeurIPS 2023,
https://arxiv.org/abs/2310.12109. The layer follows the official M2-BERT code line by line
(research/m2.md §2.1); with h the layer input:

    z          = ShortConv(in_linear(u)),  u = h (LN(h) for the legacy 80M checkpoint)
    x1, x2, v  = split(z)                                  # each D channels, in this order
    y          = (LongConv_1(v ⊙ x1) + D1 ⊙ (v ⊙ x1)) ⊙ x2
    y          = out_linear(y + LongConv_2(u) + D2 ⊙ u)    # the "residual long conv"
    out        = LN(y + BlockdiagLinear(gelu(a_gate) ⊙ a_val)),  [a_gate, a_val] = Bd(y)

There is no residual from h around the layer: the second long convolution and its skip D2
carry it. Long convolutions use implicit Hyena filters (`bigs_jax.layers.longconv`), both
directions in M2-BERT, the causal half in M2-GPT. The MLP is a GLU whose two projections are
block-diagonal with 4 blocks (a single Monarch factor), post-LayerNorm with the mixer output
as its residual. Embeddings are BERT's (learned absolute positions), the vocabulary padded to
30528, the MLM head BERT's with the decoder tied to the word embeddings.

M2-GPT has no released code (research/m2.md §2.7); ours is the same layer with causal long
convolutions (`causal=True`) and a tied LM head. `mlp=False` is the MLP-free variant; its
layer is out = LN(h + mixer(h)) (our choice: without the MLP's post-norm residual the stack
would have no normalization at all).

Padding: by default pads never reach real tokens (long-conv inputs are zeroed at pads; the
short conv is causal). `official_padding=True` leaves pads in, as the released checkpoints
were trained and are used (inputs padded to max_len).

Dimension key: B batch, L length, D model, F mlp (GLU inner), C vocab, P predicted positions.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.blocks import block_call, check_remat
from bigs_jax.layers.embeddings import BertEmbeddings
from bigs_jax.layers.linear import dense, gelu_exact, layer_norm
from bigs_jax.layers.longconv import CONV_MODES, ImplicitFilter, ShortConv
from bigs_jax.layers.monarch import BlockdiagLinear
from bigs_jax.models.encoder import ids_or_embeds
from bigs_jax.models.heads import POOLERS, ClassificationHead, MLMHead, pool
from bigs_jax.models.outputs import ModelOutput, check_dtype_policy, with_output_dtype

ENCODER_HEADS = ("mlm", "classification", "pooler", "none")
DECODER_HEADS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class M2Config:
    """Hyperparameters of M2. Official `BertConfig`/yaml names in comments."""

    causal: bool = False                     # M2-GPT; False is M2-BERT (`bidirectional`)
    vocab_size: int = 30528                  # bert-base-uncased padded to a multiple of 8
    max_len: int = 128                       # max_position_embeddings = long_conv_l_max
    positions: bool = True                   # use_positional_encodings (learned, absolute)
    type_vocab_size: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072
    mlp: bool = True                         # block-diagonal GLU MLP (use_monarch_mlp)
    mlp_nblocks: int = 4                     # monarch_mlp_nblocks
    filter_order: int = 128                  # hyena_filter_order
    filter_emb_dim: int = 5                  # hyena_emb_dim
    filter_w: float = 10.0                   # hyena_w
    filter_w_mod: float = 1.0                # hyena_w_mod
    short_conv_size: int = 3
    residual_long_conv: bool = True
    mixer_norm: bool = False                 # hyena_training_additions (released 80M only)
    norm_eps: float = 1e-12
    dropout: float = 0.1                     # embeddings and MLP (hidden_dropout_prob)
    classifier_dropout: Optional[float] = None
    init_std: float = 0.02                   # initializer_range
    head: str = "mlm"                        # mlm | classification | pooler | none; lm (causal)
    num_labels: int = 2
    pooler: str = "cls"                      # cls | mean | non_padding_mean
    conv_mode: str = "fft"                   # fft | monarch | toeplitz
    official_padding: bool = False
    # dtype policy (outputs.DTYPES): parameter storage, compute, logits
    param_dtype: str = "float32"
    dtype: str = "float32"
    output_dtype: str = "float32"
    remat: str = "none"                      # per-layer rematerialization, see blocks.REMAT

    def __post_init__(self):
        check_dtype_policy(self)
        check_remat(self.remat)
        heads = DECODER_HEADS if self.causal else ENCODER_HEADS
        for name, value, valid in (("head", self.head, heads), ("pooler", self.pooler, POOLERS),
                                   ("conv_mode", self.conv_mode, CONV_MODES)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r} for an M2 model with "
                                 f"causal={self.causal}; choose one of {valid}")
        if self.hidden_size % self.mlp_nblocks or self.intermediate_size % self.mlp_nblocks:
            raise ValueError(f"hidden_size {self.hidden_size} and intermediate_size "
                             f"{self.intermediate_size} must be multiples of mlp_nblocks "
                             f"{self.mlp_nblocks}")


class M2SequenceMixer(nnx.Module):
    """The M2 sequence mixer (official `MonarchMixerSequenceMixing`); names are official."""

    def __init__(self, c: M2Config, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        kw = dict(rngs=rngs, init_std=c.init_std, dtype=dt)
        filt = dict(l_max=c.max_len, order=c.filter_order, emb_dim=c.filter_emb_dim,
                    w=c.filter_w, w_mod=c.filter_w_mod, bidirectional=not c.causal, rngs=rngs)
        self.norm = nnx.data(layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
                             if c.mixer_norm else None)
        self.in_linear = dense(d, 3 * d, ("embed", "mlp"), **kw)
        self.short_filter = ShortConv(3 * d, c.short_conv_size, rngs=rngs)
        self.filter_fn = ImplicitFilter(d, **filt)
        self.filter_fn2 = nnx.data(ImplicitFilter(d, **filt) if c.residual_long_conv else None)
        self.out_linear = dense(d, d, ("mlp", "embed"), **kw)
        self.mode, self.dtype = c.conv_mode, dt
        self.mask_pads = not (c.official_padding or c.causal)

    def __call__(self, h_BLD: jax.Array, mask_BL: Optional[jax.Array]) -> jax.Array:
        u_BLD = self.norm(h_BLD) if self.norm is not None else h_BLD
        # Right pads reach real tokens only through the future half of a long conv; zeroing
        # its inputs there makes real outputs exactly those of the unpadded sequence.
        keep_BL1 = (mask_BL[..., None].astype(jnp.float32)
                    if self.mask_pads and mask_BL is not None else None)
        z_BL3 = self.short_filter(self.in_linear(u_BLD))
        x1_BLD, x2_BLD, v_BLD = jnp.split(z_BL3, 3, axis=-1)
        v_BLD = v_BLD * x1_BLD
        if keep_BL1 is not None:
            v_BLD = v_BLD * keep_BL1.astype(v_BLD.dtype)
        y_BLD = self.filter_fn(v_BLD, mode=self.mode) * x2_BLD.astype(jnp.float32)
        if self.filter_fn2 is not None:
            r_BLD = u_BLD if keep_BL1 is None else u_BLD * keep_BL1.astype(u_BLD.dtype)
            y_BLD = y_BLD + self.filter_fn2(r_BLD, mode=self.mode)
        return self.out_linear(y_BLD.astype(self.dtype))


class GLUMLP(nnx.Module):
    """Block-diagonal GLU MLP with post-LN (official `BertGatedLinearUnitMLP`)."""

    def __init__(self, c: M2Config, *, rngs: nnx.Rngs):
        d, f, dt = c.hidden_size, c.intermediate_size, jnp.dtype(c.dtype)
        self.gated_layers = BlockdiagLinear(d, 2 * f, nblocks=c.mlp_nblocks, use_bias=False,
                                            axes=("embed", "mlp"), dtype=dt, rngs=rngs)
        self.wo = BlockdiagLinear(f, d, nblocks=c.mlp_nblocks, use_bias=True,
                                  axes=("mlp", "embed"), dtype=dt, rngs=rngs)
        self.norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.dropout = nnx.Dropout(c.dropout)
        self.inner = f

    def __call__(self, y_BLD, *, deterministic=True, rngs=None):
        a_BLF = self.gated_layers(y_BLD)
        m_BLF = gelu_exact(a_BLF[..., :self.inner]) * a_BLF[..., self.inner:]
        m_BLF = self.dropout(m_BLF, deterministic=deterministic, rngs=rngs)
        return self.norm(self.wo(m_BLF) + y_BLD)


class M2Layer(nnx.Module):
    """Sequence mixer then the GLU MLP (or, with mlp=False, LN(h + mixer(h)))."""

    def __init__(self, c: M2Config, *, rngs: nnx.Rngs):
        self.mixer = M2SequenceMixer(c, rngs=rngs)
        self.mlp = nnx.data(GLUMLP(c, rngs=rngs) if c.mlp else None)
        self.norm = nnx.data(None if c.mlp else layer_norm(
            c.hidden_size, eps=c.norm_eps, rngs=rngs, dtype=jnp.dtype(c.dtype)))

    def __call__(self, h_BLD, mask_BL, *, deterministic=True, rngs=None):
        y_BLD = self.mixer(h_BLD, mask_BL)
        if self.mlp is None:
            return self.norm(h_BLD + y_BLD)
        return self.mlp(y_BLD, deterministic=deterministic, rngs=rngs)


class M2(nnx.Module):
    """Embeddings → `num_layers` M2 layers → head. See the module docstring."""

    def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = jnp.dtype(c.dtype)
        self.embeddings = BertEmbeddings(c.vocab_size, c.max_len, c.type_vocab_size,
                                         c.hidden_size, norm_eps=c.norm_eps, dropout=c.dropout,
                                         init_std=c.init_std, dtype=dt,
                                         learned_positions=c.positions, rngs=rngs)
        self.layers = nnx.List([M2Layer(c, rngs=rngs) for _ in range(c.num_layers)])
        drop = c.dropout if c.classifier_dropout is None else c.classifier_dropout
        self.mlm_head = nnx.data(MLMHead(c.hidden_size, c.vocab_size, norm_eps=c.norm_eps,
                                         init_std=c.init_std, dtype=dt, rngs=rngs)
                                 if c.head == "mlm" else None)
        self.classifier = nnx.data(ClassificationHead(
            c.hidden_size, c.num_labels, pooler=c.pooler, dropout=drop, init_std=c.init_std,
            dtype=dt, rngs=rngs) if c.head == "classification" else None)
        # The retrieval checkpoints' embedding: tanh(Dense(pool(h))) (official BertPooler).
        self.pooler = nnx.data(dense(c.hidden_size, c.hidden_size, ("embed", None), rngs=rngs,
                                     init_std=c.init_std, dtype=dt)
                               if c.head == "pooler" else None)

    @with_output_dtype
    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
        token_type_ids: Optional[jax.Array] = None,
        *,
        inputs_embeds: Optional[jax.Array] = None,
        mlm_positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        deterministic: bool = True,
        rngs: Optional[nnx.Rngs] = None,
    ) -> ModelOutput:
        """Run a right-padded batch.

        Args:
          input_ids: (B, L) int token ids, L ≤ max_len.
          attention_mask: (B, L), 1 for real tokens and 0 for pads (right padding).
          inputs_embeds: (B, L, D) token embeddings to use instead of `input_ids` (frozen
            backbones with input adapters, as in FPT); positions, types and LN still apply.
          token_type_ids: (B, L) segment ids (encoder only).
          mlm_positions: (B, P) positions at which to compute MLM logits; all L if None.
          segment_ids, positions: packed rows are refused (`SEGMENTS_REFUSAL`): the long and
            short convolutions and the Monarch mixing have no segment-aware path yet, and
            ignoring the segments would let packed examples see each other.
          deterministic: disable dropout.
          rngs: dropout randomness when not deterministic.

        Returns:
          hidden_states (B, L, D); logits (B, L, C) for the LM head, (B, P, C) for the MLM
          head, (B, num_labels) for classification; pooled (B, D) for classification/pooler.
        """
        if segment_ids is not None or positions is not None:
            raise ValueError(SEGMENTS_REFUSAL)
        c = self.config
        ids_BL, embeds_BLD = ids_or_embeds(input_ids, inputs_embeds)
        mask_BL = None if attention_mask is None else jnp.asarray(attention_mask)
        kw = dict(deterministic=deterministic, rngs=rngs)
        x_BLD = self.embeddings(ids_BL, None if token_type_ids is None
                                else jnp.asarray(token_type_ids),
                                inputs_embeds_BLD=embeds_BLD, **kw)
        apply = block_call(c.remat, deterministic)
        for layer in self.layers:
            x_BLD = apply(layer, x_BLD, mask_BL, rngs)
        word_CD = self.embeddings.word.embedding[...]
        if c.head == "lm":
            logits_BLC = jnp.einsum("BLD,CD->BLC", x_BLD, word_CD.astype(x_BLD.dtype),
                                    preferred_element_type=jnp.float32)
            return ModelOutput(hidden_states=x_BLD, logits=logits_BLC)
        if self.mlm_head is not None:
            h_BPD = x_BLD if mlm_positions is None else jnp.take_along_axis(
                x_BLD, jnp.asarray(mlm_positions)[..., None], axis=1)
            return ModelOutput(hidden_states=x_BLD, logits=self.mlm_head(h_BPD, word_CD))
        if self.classifier is not None:
            logits, pooled = self.classifier(x_BLD, mask_BL, **kw)
            return ModelOutput(hidden_states=x_BLD, logits=logits, pooled=pooled)
        if self.pooler is not None:
            pooled_BD = jnp.tanh(self.pooler(pool(x_BLD, mask_BL, c.pooler)))
            return ModelOutput(hidden_states=x_BLD, pooled=pooled_BD)
        return ModelOutput(hidden_states=x_BLD)


# ---------------------------------------------------------------------------- registry

FAMILY = "m2"
SEGMENTS_REFUSAL = ("M2 cannot keep packed examples apart (its long and short convolutions "
                    "have no segment-aware path); use an unpacked task (drop pack=1) for M2")
# The implicit long-convolution filters (sine MLPs of positions): bfloat16 rounding of
# their weights moves the outputs by ~10% (measured on m2-bert-tiny).
FP32_PARAMS = (r"(^|/)filter_fn2?/",)
Config = M2Config
Model = M2

# The released M2-BERT sizes (research/m2.md §2.5): 12 layers each; "large" is wider, not
# deeper. The released 80M checkpoint also has the legacy mixer LayerNorm: mixer_norm=True.
_BERT = dict(causal=False, head="mlm", max_len=128)
SIZES: dict[str, dict] = {
    "m2-bert-tiny": dict(_BERT, hidden_size=64, num_layers=2, intermediate_size=128,
                         filter_order=16),
    "m2-bert-small": dict(_BERT, hidden_size=256, num_layers=4, intermediate_size=1024,
                          filter_order=64),
    "m2-bert-80m": dict(_BERT, hidden_size=768, intermediate_size=3072),
    "m2-bert-110m": dict(_BERT, hidden_size=960, intermediate_size=3840),
    "m2-bert-260m": dict(_BERT, hidden_size=1536, intermediate_size=6144),
    "m2-bert-341m": dict(_BERT, hidden_size=1792, intermediate_size=7168),
    # The long-context retrieval encoders (togethercomputer/m2-bert-80M-*-retrieval).
    **{f"m2-bert-80m-{k}k-retrieval": dict(causal=False, head="pooler", max_len=1024 * k,
                                            hidden_size=768, intermediate_size=3072)
       for k in (2, 8, 32)},
}
# M2-GPT (no released config): GPT-2 widths/depths and vocabulary, MLP = 4·D, causal convs.
_GPT = dict(causal=True, head="lm", vocab_size=50257, type_vocab_size=0, dropout=0.0)
for _name, _dims in (("tiny", dict(hidden_size=64, num_layers=2, intermediate_size=256,
                                   filter_order=16, max_len=128)),
                     ("mini", dict(hidden_size=256, num_layers=4, intermediate_size=1024,
                                   filter_order=64, max_len=256)),
                     ("small", dict(hidden_size=768, num_layers=12, intermediate_size=3072,
                                    max_len=1024)),
                     ("medium", dict(hidden_size=1024, num_layers=24, intermediate_size=4096,
                                     max_len=1024))):
    SIZES[f"m2-gpt-{_name}"] = dict(_GPT, **_dims)
    SIZES[f"m2-gpt-{_name}-nomlp"] = dict(_GPT, **_dims, mlp=False)
