"""Bidirectional encoders: BERT, BiGS, and the two ablations between them.

BiGS: Wang, Yan, Gu, Rush, "Pretraining Without Attention", arXiv 2212.10544.
BERT: Devlin et al., arXiv 1810.04805.

One encoder, two switches. `block` picks the layer layout: `stack` is the transformer layout
(mixer sublayer, then a feed-forward sublayer, each with a residual and a LayerNorm); `gated`
is the BiGS layout (a multiplicatively gated block with the mixer inside, no separate
feed-forward). `mixer` picks what mixes positions: `attention` (softmax self-attention) or
`ssm` (a forward S4D and a backward S4D on the reversed sequence). stack+attention is BERT,
gated+ssm is BiGS, and the other two are the paper's ablations (STACK/SSM, GATED/ATT).

The gated+ssm block follows the official Flax code line by line (research/bigs.md §1.3),
with Z = LN(X) and X_out = X + O (pre-norm):

    V  = gelu_tanh(Z W_dv)                 F  = gelu_tanh(Z W_du_forward)
    Bk = gelu_tanh(Z W_du_backward)        F' = SSM_f(F)      B' = rev(SSM_b(rev(Bk)))
    U  = (F' W_duc_forward) ⊙ (B' W_duc_backward)
    O  = (gelu_tanh(U W_dol) ⊙ V) W_do

(The official code reverses Z before du_backward and reverses back after duc_backward; dense
layers act per position, so that equals reversing around the SSM alone.) `rev` reverses each
sequence within its own length, so pads never reach real tokens; `official_padding=True`
flips the whole padded length instead, as the released checkpoints were trained.

Dimension key: B batch, L length, D model, F mlp (intermediate), H heads, N ssm state,
C vocab, P predicted positions, Y labels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.attention import SelfAttention, make_attention_mask
from bigs_jax.layers.blocks import check_remat, run_layers
from bigs_jax.layers.embeddings import BertEmbeddings, padded_vocab
from bigs_jax.layers.linear import activation, dense, gelu_tanh, layer_norm
from bigs_jax.layers.mlp import MLP
from bigs_jax.layers.ssm import MODES, PRECISIONS, S4D, resolve_mode, reverse_padded
from bigs_jax.models.heads import POOLERS, ClassificationHead, MLMHead
from bigs_jax.models.outputs import (ModelOutput, check_dtype_policy, ids_or_embeds,
                                     with_output_dtype)

BLOCKS = ("stack", "gated")
MIXERS = ("attention", "ssm")
HEADS = ("mlm", "classification", "none")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of an encoder. Field names follow HF `BertConfig` where one exists."""

    block: str = "stack"
    mixer: str = "attention"
    vocab_size: int = 30522
    vocab_multiple: int = 1                  # pad the word table (and logits) to a multiple
    max_len: int = 512
    type_vocab_size: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072
    num_heads: int = 12
    qk_head_dim: Optional[int] = None        # default hidden_size // num_heads
    v_head_dim: Optional[int] = None         # default hidden_size // num_heads
    ssm_state: int = 64
    ssm_shared: bool = True                  # one SSM for all channels (official BiGS)
    ssm_init: str = "legs"                   # legs | lin | inv
    ssm_dt_min: float = 0.01
    ssm_dt_max: float = 1.0
    ssm_mode: str = "auto"                   # auto | fft | chunked | scan | toeplitz (ssm.MODES)
    ssm_precision: str = "fp32"              # chunked-mode matmuls: fp32 | bf16_3x | bf16
    pre_norm: Optional[bool] = None          # None: True for gated (BiGS), False for stack (BERT)
    hidden_act: str = "gelu"                 # the stack block's feed-forward activation
    norm_eps: float = 1e-12
    dropout: float = 0.1                     # embeddings, stack sublayers (gated blocks: none)
    attention_dropout: float = 0.1
    attention_dropout_broadcast: bool = False  # one (L, L) mask for all examples and heads
    classifier_dropout: Optional[float] = None
    init_std: float = 0.02
    mlm_head_init_std: Optional[float] = 0.02  # None: lecun normal (official BiGS head dense)
    head: str = "mlm"                        # mlm | classification | none
    num_labels: int = 2
    pooler: str = "cls"                      # cls | mean | non_padding_mean
    official_padding: bool = False           # reproduce the official BiGS padding behaviour
    # dtype policy (outputs.DTYPES): parameter storage, compute, logits
    param_dtype: str = "float32"
    dtype: str = "float32"
    output_dtype: str = "float32"
    remat: str = "none"                      # per-layer rematerialization, see blocks.REMAT
    scan_layers: bool = False                # one jax.lax.scan over the blocks (blocks.run_layers)

    def __post_init__(self):
        check_dtype_policy(self)
        for name, value, valid in (("block", self.block, BLOCKS), ("mixer", self.mixer, MIXERS),
                                   ("head", self.head, HEADS), ("pooler", self.pooler, POOLERS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {valid}")
        if self.ssm_mode not in MODES + ("auto",):
            raise ValueError(f"unknown ssm_mode {self.ssm_mode!r}; choose one of "
                             f"{list(MODES + ('auto',))}")
        if self.ssm_precision not in PRECISIONS:
            raise ValueError(f"unknown ssm_precision {self.ssm_precision!r}; choose one of "
                             f"{list(PRECISIONS)}")
        activation(self.hidden_act)
        check_remat(self.remat)
        padded_vocab(self.vocab_size, self.vocab_multiple)

    @property
    def uses_pre_norm(self) -> bool:
        return self.block == "gated" if self.pre_norm is None else self.pre_norm


def _compute_dtype(config) -> jnp.dtype:
    return jnp.dtype(config.dtype)


class BiSSM(nnx.Module):
    """STACK/SSM mixer: concat(SSM_f(x), rev(SSM_b(rev(x)))) then Dense(2D → D)."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, _compute_dtype(c)
        ssm = dict(state_size=c.ssm_state, shared=c.ssm_shared, init=c.ssm_init,
                   dt_min=c.ssm_dt_min, dt_max=c.ssm_dt_max, rngs=rngs)
        self.fs4 = S4D(d, **ssm)
        self.bs4 = S4D(d, **ssm)
        self.out = dense(2 * d, d, ("mlp", "embed"), rngs=rngs, init_std=c.init_std, dtype=dt)
        self.mode, self.official = resolve_mode(c.ssm_mode), c.official_padding
        self.precision = c.ssm_precision

    def __call__(self, x_BLD, mask_BL, segment_ids_BL=None, **_):
        f_BLD, b_BLD = _bidirectional(self.fs4, self.bs4, x_BLD, x_BLD, mask_BL,
                                      self.official, self.mode, segment_ids_BL, self.precision)
        return self.out(jnp.concatenate([f_BLD, b_BLD], axis=-1))


def _bidirectional(fs4: S4D, bs4: S4D, f_BLD, b_BLD, mask_BL, official: bool, mode: str,
                   segment_ids_BL=None, precision: str = "fp32"):
    """Forward SSM on f; backward SSM on b reversed within each sequence's length.

    The chunked mode runs the backward SSM anticausally instead (the same outputs on real
    tokens, pads zeroed first unless `official`; no reversal of the data). Packed rows
    (`segment_ids_BL`) reverse as a whole: each segment comes out reversed in place of
    another, and the segment-aware SSM keeps it to itself either way.
    """
    if mask_BL is None:
        official = True  # no pads: reversing the full length is reversing each sequence
    ssm_mask = None if official else mask_BL
    seg_f = segment_ids_BL
    kw = dict(mode=mode, precision=precision)
    if mode == "chunked" and seg_f is None:
        return (fs4(f_BLD, ssm_mask, **kw), bs4(b_BLD, ssm_mask, anticausal=True, **kw))
    seg_b = None if seg_f is None else reverse_padded(seg_f, mask_BL, official_padding=official)
    f_BLD = fs4(f_BLD, ssm_mask, segment_ids_BL=seg_f, **kw)
    b_BLD = reverse_padded(b_BLD, mask_BL, official_padding=official)
    b_BLD = reverse_padded(bs4(b_BLD, ssm_mask, segment_ids_BL=seg_b, **kw), mask_BL,
                           official_padding=official)
    return f_BLD, b_BLD


class StackBlock(nnx.Module):
    """Transformer layer: mixer sublayer then feed-forward, post-norm (BERT) or pre-norm."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, _compute_dtype(c)
        if c.mixer == "attention":
            self.mixer = SelfAttention(d, c.num_heads, qk_head_dim=c.qk_head_dim,
                                       v_head_dim=c.v_head_dim, dropout=c.attention_dropout,
                                       broadcast_dropout=c.attention_dropout_broadcast,
                                       init_std=c.init_std, dtype=dt, rngs=rngs)
        else:
            self.mixer = BiSSM(c, rngs=rngs)
        self.mixer_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.mlp = MLP(d, c.intermediate_size, act=c.hidden_act, dropout=c.dropout,
                       init_std=c.init_std, dtype=dt, rngs=rngs)
        self.mlp_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.dropout = nnx.Dropout(c.dropout)
        self.pre_norm, self.attention = c.uses_pre_norm, c.mixer == "attention"

    def __call__(self, x_BLD, mask_BL, attn_mask, segment_ids_BL=None, *, deterministic=True,
                 rngs=None):
        kw = dict(deterministic=deterministic, rngs=rngs)

        def mix(h_BLD):
            if self.attention:
                return self.dropout(self.mixer(h_BLD, attn_mask, **kw), **kw)
            return self.dropout(self.mixer(h_BLD, mask_BL, segment_ids_BL, **kw), **kw)

        if self.pre_norm:
            x_BLD = x_BLD + mix(self.mixer_norm(x_BLD))
            return x_BLD + self.mlp(self.mlp_norm(x_BLD), **kw)
        x_BLD = self.mixer_norm(x_BLD + mix(x_BLD))
        return self.mlp_norm(x_BLD + self.mlp(x_BLD, **kw))


class GatedBlock(nnx.Module):
    """The BiGS gated block (module docstring); the mixer is two SSMs or self-attention.

    Parameter names are the official checkpoint's (`dv`, `du_forward`, ..., `do`).
    GATED/ATT replaces the forward/backward pair by one bidirectional self-attention on
    gelu(Z W_du_forward), whose output takes the place of U.
    """

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        d, f, dt = c.hidden_size, c.intermediate_size, _compute_dtype(c)
        kw = dict(rngs=rngs, init_std=c.init_std, dtype=dt)
        self.norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.dv = dense(d, f, ("embed", "mlp"), **kw)
        self.du_forward = dense(d, d, ("embed", "mlp"), **kw)
        if c.mixer == "ssm":
            ssm = dict(state_size=c.ssm_state, shared=c.ssm_shared, init=c.ssm_init,
                       dt_min=c.ssm_dt_min, dt_max=c.ssm_dt_max, rngs=rngs)
            self.du_backward = dense(d, d, ("embed", "mlp"), **kw)
            self.fs4 = S4D(d, **ssm)
            self.bs4 = S4D(d, **ssm)
            self.duc_forward = dense(d, d, ("mlp", "embed"), **kw)
            self.duc_backward = dense(d, d, ("mlp", "embed"), **kw)
        else:
            self.attention = SelfAttention(d, c.num_heads, qk_head_dim=c.qk_head_dim,
                                           v_head_dim=c.v_head_dim,
                                           dropout=c.attention_dropout,
                                           broadcast_dropout=c.attention_dropout_broadcast, **kw)
        self.dol = dense(d, f, ("embed", "mlp"), **kw)
        self.do = dense(f, d, ("mlp", "embed"), **kw)
        self.mixer, self.mode = c.mixer, resolve_mode(c.ssm_mode)
        self.official, self.pre_norm = c.official_padding, c.uses_pre_norm
        self.precision = c.ssm_precision

    def __call__(self, x_BLD, mask_BL, attn_mask, segment_ids_BL=None, *, deterministic=True,
                 rngs=None):
        z_BLD = self.norm(x_BLD) if self.pre_norm else x_BLD
        v_BLF = gelu_tanh(self.dv(z_BLD))
        if self.mixer == "ssm":
            f_BLD, b_BLD = _bidirectional(
                self.fs4, self.bs4, gelu_tanh(self.du_forward(z_BLD)),
                gelu_tanh(self.du_backward(z_BLD)), mask_BL, self.official, self.mode,
                segment_ids_BL, self.precision)
            u_BLD = self.duc_forward(f_BLD) * self.duc_backward(b_BLD)
        else:
            u_BLD = self.attention(gelu_tanh(self.du_forward(z_BLD)), attn_mask,
                                   deterministic=deterministic, rngs=rngs)
        h_BLF = gelu_tanh(self.dol(u_BLD))
        o_BLD = self.do(h_BLF * v_BLF)
        return x_BLD + o_BLD if self.pre_norm else self.norm(x_BLD + o_BLD)


class Encoder(nnx.Module):
    """Embeddings → `num_layers` blocks → optional head. See the module docstring."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = _compute_dtype(c)
        self.embeddings = BertEmbeddings(c.vocab_size, c.max_len, c.type_vocab_size,
                                         c.hidden_size, norm_eps=c.norm_eps, dropout=c.dropout,
                                         init_std=c.init_std, dtype=dt,
                                         vocab_multiple=c.vocab_multiple, rngs=rngs)
        block = StackBlock if c.block == "stack" else GatedBlock
        self.layers = nnx.List([block(c, rngs=rngs) for _ in range(c.num_layers)])
        drop = c.dropout if c.classifier_dropout is None else c.classifier_dropout
        self.mlm_head = nnx.data(MLMHead(
            c.hidden_size, c.vocab_size, norm_eps=c.norm_eps, init_std=c.mlm_head_init_std,
            dtype=dt, vocab_multiple=c.vocab_multiple, rngs=rngs) if c.head == "mlm" else None)
        self.classifier = nnx.data(ClassificationHead(
            c.hidden_size, c.num_labels, pooler=c.pooler, dropout=drop, init_std=c.init_std,
            dtype=dt, rngs=rngs) if c.head == "classification" else None)

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
        """Encode a right-padded batch.

        Args:
          input_ids: (B, L) int token ids.
          attention_mask: (B, L), 1 for real tokens and 0 for pads (right padding).
          inputs_embeds: (B, L, D) token embeddings to use instead of `input_ids` (frozen
            backbones with input adapters, as in FPT); positions, types and LN still apply.
          token_type_ids: (B, L) segment ids of sentence pairs.
          mlm_positions: (B, P) positions at which to compute MLM logits; all L if None.
          segment_ids: (B, L) packed rows: examples 1, 2, ... of a row (0 on pads) never
            see each other (attention masks; SSMs reset at segment starts).
          positions: (B, L) position ids restarting in each segment; 0..L-1 if None.
          deterministic: disable dropout.
          rngs: dropout randomness when not deterministic.
        """
        ids_BL, embeds_BLD = ids_or_embeds(
            input_ids, inputs_embeds, attention_mask=attention_mask,
            token_type_ids=token_type_ids, segment_ids=segment_ids, positions=positions)
        mask_BL = None if attention_mask is None else jnp.asarray(attention_mask)
        kw = dict(deterministic=deterministic, rngs=rngs)
        seg_BL = None if segment_ids is None else jnp.asarray(segment_ids)
        x_BLD = self.embeddings(ids_BL, None if token_type_ids is None
                                else jnp.asarray(token_type_ids),
                                None if positions is None else jnp.asarray(positions),
                                inputs_embeds_BLD=embeds_BLD, **kw)
        attn_mask = make_attention_mask(mask_BL, x_BLD.shape[1], segment_ids_BL=seg_BL)
        x_BLD = run_layers(self.layers, x_BLD, mask_BL, attn_mask, seg_BL, rngs=rngs,
                           remat=self.config.remat, deterministic=deterministic,
                           scan=self.config.scan_layers)
        if self.mlm_head is not None:
            h_BPD = x_BLD if mlm_positions is None else jnp.take_along_axis(
                x_BLD, jnp.asarray(mlm_positions)[..., None], axis=1)
            logits = self.mlm_head(h_BPD, self.embeddings.word.embedding[...])
            return ModelOutput(hidden_states=x_BLD, logits=logits)
        if self.classifier is not None:
            logits, pooled = self.classifier(x_BLD, mask_BL, **kw)
            return ModelOutput(hidden_states=x_BLD, logits=logits, pooled=pooled)
        return ModelOutput(hidden_states=x_BLD)


# ---------------------------------------------------------------------------- registry

FAMILY = "encoder"
# The S4D parameters: the kernel is computed from them in float32 and is sensitive to Δ·A.
FP32_PARAMS = (r"(^|/)(fs4|bs4)/",)
Config = EncoderConfig
Model = Encoder

# Named sizes. BERT base/large: Devlin et al. bigs-large: the released BiGS checkpoints.
_BERT = dict(block="stack", mixer="attention")
_BIGS = dict(block="gated", mixer="ssm")
_BASE = dict(hidden_size=768, num_layers=12, intermediate_size=3072, num_heads=12)
_LARGE = dict(hidden_size=1024, num_layers=24, intermediate_size=4096, num_heads=16)
# The official BiGS size: a gated layer holds ~13.6M params, so 23 of them match BERT-large.
_BIGS_LARGE = dict(hidden_size=1024, num_layers=23, intermediate_size=3072, num_heads=16,
                   max_len=128, mlm_head_init_std=None)
_BIGS_BASE = dict(hidden_size=768, num_layers=12, intermediate_size=2304, num_heads=12,
                  mlm_head_init_std=None)
# Small sizes for CPU runs, smoke configs and tests.
_SMALL = dict(hidden_size=256, num_layers=4, intermediate_size=1024, num_heads=4, max_len=128)
_TINY = dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=2, max_len=128,
             ssm_state=16)

SIZES: dict[str, dict] = {}
for _size, _dims, _gated_dims in (("tiny", _TINY, _TINY), ("small", _SMALL, _SMALL),
                                  ("base", _BASE, _BIGS_BASE), ("large", _LARGE, _BIGS_LARGE)):
    SIZES[f"bert-{_size}"] = {**_BERT, **_dims}
    SIZES[f"bigs-{_size}"] = {**_BIGS, **_gated_dims}
    SIZES[f"stack-ssm-{_size}"] = {"block": "stack", "mixer": "ssm", **_dims}
    SIZES[f"gated-attention-{_size}"] = {"block": "gated", "mixer": "attention", **_gated_dims}
