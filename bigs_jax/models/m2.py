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

Layout: the layer stack runs channel-major, hidden states (B, D, L) between the embeddings
and the head (`channel_major=True`, one transpose in and one out). The long convolutions'
FFTs then run along the last axis with no transpose around them, the dense projections are
GEMMs Wᵀ·x that write (D, L) directly, and the block-diagonal MLP is one such GEMM per block of
contiguous channel rows (`linear.matmul_channels`, `monarch.blockdiag_matmul_channels`: both
keep XLA:CPU on its fast GEMM; bench/m2.py times the stack against `channel_major=False`, the
(B, L, D) stack, and against the fp32 matmul roofline). The cached decoding path and
`M2SequenceMixer.__call__` (M2-ViT's mixer) keep (B, L, D).

Long convolutions: `conv_mode='auto'` (the default) runs them by `jnp.fft` on CPU and as
Monarch DFT GEMMs on TPU/GPU (`longconv.resolve_conv_mode`); `conv_precision` sets those GEMMs'
(and the toeplitz mode's) level, fp32 | bf16_3x | bf16 (`bigs_jax.layers.precision`; errors
measured in longconv's docstring). An explicit `conv_mode='fft'` with a reduced precision is
refused; M2-GPT's cached decoding (exact dot products over the cache) stays fp32.

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

from bigs_jax.layers.blocks import check_remat, run_layers
from bigs_jax.layers.embeddings import BertEmbeddings, mask_pad_logits, padded_vocab
from bigs_jax.layers.linear import LayerNorm, dense, gelu_exact, layer_norm, matmul_channels
from bigs_jax.layers.longconv import CONV_MODES, ImplicitFilter, ShortConv, modulation_deltas
from bigs_jax.layers.monarch import BlockdiagLinear
from bigs_jax.layers.precision import check_precision
from bigs_jax.models.heads import POOLERS, ClassificationHead, MLMHead, pool
from bigs_jax.models.outputs import (ModelOutput, check_dtype_policy, ids_or_embeds,
                                     with_output_dtype)

ENCODER_HEADS = ("mlm", "classification", "pooler", "none")
DECODER_HEADS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class M2Config:
    """Hyperparameters of M2. Official `BertConfig`/yaml names in comments."""

    causal: bool = False                     # M2-GPT; False is M2-BERT (`bidirectional`)
    vocab_size: int = 30528                  # bert-base-uncased padded to a multiple of 8
    vocab_multiple: int = 1                  # pad the word table (and logits) to a multiple
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
    # Width growth by duplication (bigs_jax.growth_m2) records ((blocks, copies), ...) here so
    # every channel keeps its filter decay rate (longconv.modulation_deltas); () = official.
    decay_tiling: tuple = ()
    mixer_norm: bool = False                 # hyena_training_additions (released 80M only)
    norm_eps: float = 1e-12
    dropout: float = 0.1                     # embeddings and MLP (hidden_dropout_prob)
    classifier_dropout: Optional[float] = None
    init_std: float = 0.02                   # initializer_range
    head: str = "mlm"                        # mlm | classification | pooler | none; lm (causal)
    num_labels: int = 2
    pooler: str = "cls"                      # cls | mean | non_padding_mean
    # Long convolutions: auto (fft on CPU, monarch on TPU/GPU) | fft | monarch | toeplitz, and
    # the matmul level of monarch/toeplitz: fp32 | bf16_3x | bf16 (layers/precision.py).
    conv_mode: str = "auto"
    conv_precision: str = "fp32"
    # The layer stack runs channel-major, (B, D, L): the long convolutions' FFTs run along the
    # last axis without transposes and the block-diagonal MLP is one GEMM per block. False
    # runs it (B, L, D), the layout before issue 18 (bench/m2.py's baseline); same outputs.
    channel_major: bool = True
    official_padding: bool = False
    # dtype policy (outputs.DTYPES): parameter storage, compute, logits
    param_dtype: str = "float32"
    dtype: str = "float32"
    output_dtype: str = "float32"
    remat: str = "none"                      # per-layer rematerialization, see blocks.REMAT
    scan_layers: bool = False                # one jax.lax.scan over the blocks (blocks.run_layers)

    def __post_init__(self):
        check_dtype_policy(self)
        check_remat(self.remat)
        heads = DECODER_HEADS if self.causal else ENCODER_HEADS
        for name, value, valid in (("head", self.head, heads), ("pooler", self.pooler, POOLERS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r} for an M2 model with "
                                 f"causal={self.causal}; choose one of {valid}")
        check_conv_settings(self.conv_mode, self.conv_precision)
        if self.hidden_size % self.mlp_nblocks or self.intermediate_size % self.mlp_nblocks:
            raise ValueError(f"hidden_size {self.hidden_size} and intermediate_size "
                             f"{self.intermediate_size} must be multiples of mlp_nblocks "
                             f"{self.mlp_nblocks}")
        padded_vocab(self.vocab_size, self.vocab_multiple)
        # model.json stores the tiling as lists: back to a hashable tuple of int pairs
        try:
            tiling = tuple(tuple(int(n) for n in pair) for pair in self.decay_tiling)
        except TypeError:
            tiling = ((0,),)
        if any(len(pair) != 2 or min(pair) < 1 for pair in tiling):
            raise ValueError(f"decay_tiling {self.decay_tiling!r} must be (blocks, copies) "
                             "pairs of positive ints, as bigs_jax.growth writes them")
        object.__setattr__(self, "decay_tiling", tiling)
        modulation_deltas(self.hidden_size, tiling)  # the tiling must fit the width


def check_conv_settings(conv_mode: str, conv_precision: str) -> None:
    """One-line refusals of an unknown conv_mode or conv_precision, and of a reduced
    conv_precision with conv_mode='fft', which has no matmuls to apply it to ('auto' may pick
    fft, on CPU, and then runs it in fp32). Shared by M2Config and M2ViTConfig."""
    if conv_mode not in CONV_MODES + ("auto",):
        raise ValueError(f"unknown conv_mode {conv_mode!r}; choose one of "
                         f"{list(CONV_MODES + ('auto',))}")
    check_precision(conv_precision, "conv_precision")
    if conv_mode == "fft" and conv_precision != "fp32":
        raise ValueError(f"conv_precision={conv_precision!r} sets the matmuls of conv_mode "
                         "'monarch' or 'toeplitz', but conv_mode='fft' runs jnp.fft in fp32; "
                         "use conv_mode='monarch' (or 'auto') or conv_precision='fp32'")


def _linear_channels(linear: nnx.Linear, x_BIL: jax.Array) -> jax.Array:
    """`linear` (kernel (I, O)) on channel-major x (B, I, L) → (B, O, L), in its dtype."""
    dtype = linear.dtype or jnp.result_type(x_BIL, linear.kernel[...])
    y_BOL = matmul_channels(x_BIL.astype(dtype), linear.kernel[...].astype(dtype),
                            precision=linear.precision)
    return y_BOL + linear.bias[...].astype(dtype)[None, :, None]


def _channel_norm(norm: LayerNorm, x_BDL: jax.Array) -> jax.Array:
    """`norm` on channel-major x (B, D, L): statistics over D (axis 1), in float32 as
    `LayerNorm` computes them."""
    x32 = x_BDL.astype(jnp.promote_types(x_BDL.dtype, jnp.float32))
    centered = x32 - jnp.mean(x32, axis=1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=1, keepdims=True)
                            + norm.epsilon)
    scale, bias = norm.scale[...], norm.bias[...]
    y = (centered * inv_std * scale.astype(x32.dtype)[None, :, None]
         + bias.astype(x32.dtype)[None, :, None])
    return y.astype(norm.dtype or jnp.promote_types(x_BDL.dtype, scale.dtype))


class M2SequenceMixer(nnx.Module):
    """The M2 sequence mixer (official `MonarchMixerSequenceMixing`); names are official."""

    def __init__(self, c: M2Config, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        kw = dict(rngs=rngs, init_std=c.init_std, dtype=dt)
        filt = dict(l_max=c.max_len, order=c.filter_order, emb_dim=c.filter_emb_dim,
                    w=c.filter_w, w_mod=c.filter_w_mod, bidirectional=not c.causal,
                    decay_tiling=c.decay_tiling, rngs=rngs)
        self.norm = nnx.data(layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
                             if c.mixer_norm else None)
        self.in_linear = dense(d, 3 * d, ("embed", "mlp"), **kw)
        self.short_filter = ShortConv(3 * d, c.short_conv_size, rngs=rngs)
        self.filter_fn = ImplicitFilter(d, **filt)
        self.filter_fn2 = nnx.data(ImplicitFilter(d, **filt) if c.residual_long_conv else None)
        self.out_linear = dense(d, d, ("mlp", "embed"), **kw)
        self.mode, self.precision, self.dtype = c.conv_mode, c.conv_precision, dt
        self.mask_pads = not (c.official_padding or c.causal)

    @property
    def conv(self) -> dict:
        """The long convolutions' mode and matmul precision (`ImplicitFilter.__call__`)."""
        return {"mode": self.mode, "precision": self.precision}

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
        y_BLD = self.filter_fn(v_BLD, **self.conv) * x2_BLD.astype(jnp.float32)
        if self.filter_fn2 is not None:
            r_BLD = u_BLD if keep_BL1 is None else u_BLD * keep_BL1.astype(u_BLD.dtype)
            y_BLD = y_BLD + self.filter_fn2(r_BLD, **self.conv)
        return self.out_linear(y_BLD.astype(self.dtype))

    def channel_major(self, h_BDL: jax.Array, mask_BL: Optional[jax.Array]) -> jax.Array:
        """`__call__` on channel-major h (B, D, L); returns (B, D, L)."""
        u_BDL = _channel_norm(self.norm, h_BDL) if self.norm is not None else h_BDL
        keep_B1L = (mask_BL[:, None, :].astype(jnp.float32)
                    if self.mask_pads and mask_BL is not None else None)
        z_B3L = self.short_filter.channel_major(_linear_channels(self.in_linear, u_BDL))
        x1_BDL, x2_BDL, v_BDL = jnp.split(z_B3L, 3, axis=1)
        v_BDL = v_BDL * x1_BDL
        if keep_B1L is not None:
            v_BDL = v_BDL * keep_B1L.astype(v_BDL.dtype)
        y_BDL = self.filter_fn.channel_major(v_BDL, **self.conv) * x2_BDL.astype(jnp.float32)
        if self.filter_fn2 is not None:
            r_BDL = u_BDL if keep_B1L is None else u_BDL * keep_B1L.astype(u_BDL.dtype)
            y_BDL = y_BDL + self.filter_fn2.channel_major(r_BDL, **self.conv)
        return _linear_channels(self.out_linear, y_BDL.astype(self.dtype))

    # Decoding (M2-GPT). The cache holds, per row, the long-conv inputs of every position so
    # far (v ⊙ x1 and u, float32) and the short conv's last K-1 inputs; a new token's long
    # convolutions are dot products with the (precomputed) kernels: O(S·D) per token.

    def init_cache(self, batch: int, length: int) -> dict:
        d, K = self.out_linear.kernel.shape[1], self.short_filter.kernel.shape[0]
        cache = {"v": jnp.zeros((batch, length, d), jnp.float32),
                 "prev": jnp.zeros((batch, K - 1, 3 * d), self.dtype)}
        if self.filter_fn2 is not None:
            cache["u"] = jnp.zeros((batch, length, d), jnp.float32)
        return cache

    def decode_constants(self, length: int) -> dict:
        return {"k1": self.filter_fn.decode_table(length),
                "k2": None if self.filter_fn2 is None else self.filter_fn2.decode_table(length)}

    def prefill(self, h_BLD, lengths_B, cache: dict):
        """`__call__` on right-padded prompts, also filling `cache` (see `init_cache`)."""
        u_BLD = self.norm(h_BLD) if self.norm is not None else h_BLD
        zin_BL3 = self.in_linear(u_BLD)
        x1_BLD, x2_BLD, v_BLD = jnp.split(self.short_filter(zin_BL3), 3, axis=-1)
        v_BLD = v_BLD * x1_BLD
        y_BLD = self.filter_fn(v_BLD, **self.conv) * x2_BLD.astype(jnp.float32)
        L, K1 = u_BLD.shape[1], cache["prev"].shape[1]
        cache = dict(cache, v=cache["v"].at[:, :L].set(v_BLD.astype(jnp.float32)))
        if self.filter_fn2 is not None:
            y_BLD = y_BLD + self.filter_fn2(u_BLD, **self.conv)
            cache["u"] = cache["u"].at[:, :L].set(u_BLD.astype(jnp.float32))
        # the short conv's inputs at positions n-K+1 .. n-1 of each row (zeros before 0)
        t_BK = lengths_B[:, None] - K1 + jnp.arange(K1)[None, :]
        prev_BK3 = jnp.take_along_axis(zin_BL3, jnp.maximum(t_BK, 0)[..., None], axis=1)
        cache["prev"] = jnp.where((t_BK >= 0)[..., None], prev_BK3, 0).astype(self.dtype)
        return self.out_linear(y_BLD.astype(self.dtype)), cache

    def decode(self, h_B1D, pos_B, cache: dict, consts: dict):
        """One new token per row at position `pos_B`: (output (B, 1, D), cache)."""
        u_B1D = self.norm(h_B1D) if self.norm is not None else h_B1D
        z_B13, prev = self.short_filter.decode(self.in_linear(u_B1D), cache["prev"])
        x1_B1D, x2_B1D, v_B1D = jnp.split(z_B13, 3, axis=-1)
        rows_B = jnp.arange(h_B1D.shape[0])
        cache = dict(cache, prev=prev, v=cache["v"].at[rows_B, pos_B].set(
            (v_B1D * x1_B1D)[:, 0].astype(jnp.float32)))
        y_B1D = (self.filter_fn.decode(cache["v"], consts["k1"], pos_B)
                 * x2_B1D.astype(jnp.float32))
        if self.filter_fn2 is not None:
            cache["u"] = cache["u"].at[rows_B, pos_B].set(u_B1D[:, 0].astype(jnp.float32))
            y_B1D = y_B1D + self.filter_fn2.decode(cache["u"], consts["k2"], pos_B)
        return self.out_linear(y_B1D.astype(self.dtype)), cache


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

    def channel_major(self, y_BDL, *, deterministic=True, rngs=None):
        """`__call__` on channel-major y (B, D, L); returns (B, D, L)."""
        a_BFL = self.gated_layers.channel_major(y_BDL)
        m_BFL = gelu_exact(a_BFL[:, :self.inner]) * a_BFL[:, self.inner:]
        m_BFL = self.dropout(m_BFL, deterministic=deterministic, rngs=rngs)
        return _channel_norm(self.norm, self.wo.channel_major(m_BFL) + y_BDL)


class M2Layer(nnx.Module):
    """Sequence mixer then the GLU MLP (or, with mlp=False, LN(h + mixer(h)))."""

    def __init__(self, c: M2Config, *, rngs: nnx.Rngs):
        self.mixer = M2SequenceMixer(c, rngs=rngs)
        self.mlp = nnx.data(GLUMLP(c, rngs=rngs) if c.mlp else None)
        self.norm = nnx.data(None if c.mlp else layer_norm(
            c.hidden_size, eps=c.norm_eps, rngs=rngs, dtype=jnp.dtype(c.dtype)))
        self.channel_major = c.channel_major

    def __call__(self, h, mask_BL, *, deterministic=True, rngs=None):
        """h (B, D, L) with `channel_major` (the default), else (B, L, D); same layout out."""
        if not self.channel_major:
            y_BLD = self.mixer(h, mask_BL)
            if self.mlp is None:
                return self.norm(h + y_BLD)
            return self.mlp(y_BLD, deterministic=deterministic, rngs=rngs)
        y_BDL = self.mixer.channel_major(h, mask_BL)
        if self.mlp is None:
            return _channel_norm(self.norm, h + y_BDL)
        return self.mlp.channel_major(y_BDL, deterministic=deterministic, rngs=rngs)

    def _finish(self, h_BLD, y_BLD):
        return self.norm(h_BLD + y_BLD) if self.mlp is None else self.mlp(y_BLD)

    def prefill(self, h_BLD, lengths_B, cache):
        y_BLD, cache = self.mixer.prefill(h_BLD, lengths_B, cache)
        return self._finish(h_BLD, y_BLD), cache

    def decode(self, h_B1D, pos_B, cache, consts):
        y_B1D, cache = self.mixer.decode(h_B1D, pos_B, cache, consts)
        return self._finish(h_B1D, y_B1D), cache


class M2(nnx.Module):
    """Embeddings → `num_layers` M2 layers → head. See the module docstring."""

    def __init__(self, config: M2Config, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = jnp.dtype(c.dtype)
        self.embeddings = BertEmbeddings(c.vocab_size, c.max_len, c.type_vocab_size,
                                         c.hidden_size, norm_eps=c.norm_eps, dropout=c.dropout,
                                         init_std=c.init_std, dtype=dt,
                                         learned_positions=c.positions,
                                         vocab_multiple=c.vocab_multiple, rngs=rngs)
        self.layers = nnx.List([M2Layer(c, rngs=rngs) for _ in range(c.num_layers)])
        drop = c.dropout if c.classifier_dropout is None else c.classifier_dropout
        self.mlm_head = nnx.data(MLMHead(c.hidden_size, c.vocab_size, norm_eps=c.norm_eps,
                                         init_std=c.init_std, dtype=dt,
                                         vocab_multiple=c.vocab_multiple, rngs=rngs)
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
        ids_BL, embeds_BLD = ids_or_embeds(input_ids, inputs_embeds,
                                           attention_mask=attention_mask,
                                           token_type_ids=token_type_ids)
        mask_BL = None if attention_mask is None else jnp.asarray(attention_mask)
        kw = dict(deterministic=deterministic, rngs=rngs)
        x_BLD = self.embeddings(ids_BL, None if token_type_ids is None
                                else jnp.asarray(token_type_ids),
                                inputs_embeds_BLD=embeds_BLD, **kw)
        if c.channel_major:
            # One transpose in and one out for the whole stack (sharding constraints between
            # blocks still see the batch axis first).
            x_BDL = run_layers(self.layers, jnp.swapaxes(x_BLD, 1, 2), mask_BL, rngs=rngs,
                               remat=c.remat, deterministic=deterministic, scan=c.scan_layers)
            x_BLD = jnp.swapaxes(x_BDL, 1, 2)
        else:
            x_BLD = run_layers(self.layers, x_BLD, mask_BL, rngs=rngs, remat=c.remat,
                               deterministic=deterministic, scan=c.scan_layers)
        word_CD = self.embeddings.word.embedding[...]
        if c.head == "lm":
            return ModelOutput(hidden_states=x_BLD, logits=self._lm_logits(x_BLD))
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

    def _lm_logits(self, x_BLD):
        word_CD = self.embeddings.word.embedding[...]
        return mask_pad_logits(jnp.einsum("BLD,CD->BLC", x_BLD, word_CD.astype(x_BLD.dtype),
                                          preferred_element_type=jnp.float32),
                               self.config.vocab_size)

    # ------------------------------------------------------------ decoding (bigs_jax.generation)
    # M2-GPT decodes exactly with a cache of its long-convolution inputs. The implicit filters
    # are fixed functions of the offset, so their kernels for S cached positions are computed
    # once per generate call (`decode_constants`); a new token then costs, per layer, the
    # pointwise projections and MLP (O(D²)), the short conv from its last K-1 inputs, and two
    # long-conv dot products over the S cached inputs (O(S·D)), against O(L·D² + L log L·D)
    # for a forward over the whole prefix. (Asymptotically faster exact schemes exist, e.g.
    # Flash Inference's O(log² L) amortized tiling, arXiv 2410.12982; not implemented.)

    @property
    def can_generate(self) -> bool:
        return self.config.causal and self.config.head == "lm"

    def init_cache(self, batch: int, length: int) -> list[dict]:
        return [layer.mixer.init_cache(batch, length) for layer in self.layers]

    def decode_constants(self, length: int) -> list[dict]:
        return [layer.mixer.decode_constants(length) for layer in self.layers]

    def prefill(self, ids_BL, lengths_B, cache):
        """Right-padded prompts into the cache; (fp32 next-token logits (B, C), cache)."""
        x_BLD = self.embeddings(ids_BL)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x_BLD, layer_cache = layer.prefill(x_BLD, lengths_B, layer_cache)
            new_cache.append(layer_cache)
        last_B1D = x_BLD[jnp.arange(x_BLD.shape[0]), lengths_B - 1][:, None, :]
        return self._lm_logits(last_B1D)[:, 0], new_cache

    def decode_step(self, ids_B, pos_B, cache, consts):
        """One token per row at `pos_B`; (fp32 next-token logits (B, C), cache)."""
        x_B1D = self.embeddings(ids_B[:, None], position_ids_BL=jnp.minimum(
            pos_B, self.config.max_len - 1)[:, None])
        new_cache = []
        for layer, layer_cache, layer_consts in zip(self.layers, cache, consts):
            x_B1D, layer_cache = layer.decode(x_B1D, pos_B, layer_cache, layer_consts)
            new_cache.append(layer_cache)
        return self._lm_logits(x_B1D)[:, 0], new_cache


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
