"""A causal gated-SSM language model: the BiGS block with the forward SSM only.

BiGS: Wang, Yan, Gu, Rush, "Pretraining Without Attention", arXiv 2212.10544 (the gated
block). H3: Fu, Dao et al., "Hungry Hungry Hippos", arXiv 2212.14052 (the same idea for
causal LMs: a gated, attention-free block around a causal SSM).

The BiGS gated block keeps its layout and parameter names but drops the backward direction,
so every position sees only itself and the past; with Z = LN(X) and X_out = X + O:

    V  = gelu_tanh(Z W_dv)             F  = gelu_tanh(Z W_du_forward)
    F' = SSM_f(F)                      U  = F' W_duc_forward
    O  = (gelu_tanh(U W_dol) ⊙ V) W_do

(BiGS multiplies U by the backward branch; with one direction there is nothing to multiply
it by, and the gate V ⊙ gelu(U W_dol) remains.) Token embeddings (no positions: the SSM
knows where it is), `num_layers` pre-norm blocks, a final LayerNorm, an LM head tied to the
embeddings or untied, as GPT-2's.

Two ways to run the same function. Training and prompts use the parallel path: each SSM is a
causal convolution with its S4D kernel (`ssm_mode`: by default FFT over 2L on CPU and
chunked matmuls on TPU/GPU, `ssm.resolve_mode`). Generation uses the
recurrence (`S4D.step`: x_t = A_bar x_t-1 + B_bar u_t, y_t = Re(C x_t) + D u_t, discretized
by the same ZOH as the kernel), so a new token costs O(D² + D·N) per layer whatever the
context length, and the decoding cache is one (B, D, N) complex state per layer: no key/value
cache that grows with the context. `S4D.final_state` turns a prefilled prompt into that state.
The cache plugs into `bigs_jax.generate` as GPT-2's and M2-GPT's do.

Dimension key: B batch, L length, D model, F mlp (gate width), N ssm state, C vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.blocks import check_remat, run_layers
from bigs_jax.layers.embeddings import check_token_ids, embed, mask_pad_logits, padded_vocab
from bigs_jax.layers.linear import dense, gelu_tanh, layer_norm
from bigs_jax.layers.ssm import INITS, MODES, S4D, resolve_mode
from bigs_jax.models.outputs import ModelOutput, check_dtype_policy, with_output_dtype

SSM_MODES = MODES + ("auto",)


@dataclasses.dataclass(frozen=True)
class BigsLMConfig:
    """Hyperparameters of the causal gated-SSM LM (names as the encoder's and GPT-2's)."""

    vocab_size: int = 50257                  # GPT-2's byte-level BPE
    vocab_multiple: int = 1                  # pad the word table, head and logits to a multiple
    max_len: int = 1024                      # training length and generation limit only
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072            # F: the gate width (dv, dol)
    ssm_state: int = 64
    ssm_shared: bool = True                  # one SSM for all channels (official BiGS)
    ssm_init: str = "legs"                   # legs | lin | inv
    ssm_dt_min: float = 0.01
    ssm_dt_max: float = 1.0
    ssm_mode: str = "auto"                   # auto | fft | chunked | scan | recurrent | toeplitz
    norm_eps: float = 1e-5
    dropout: float = 0.1                     # on the embeddings (BiGS has none in the block)
    init_std: float = 0.02
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
        padded_vocab(self.vocab_size, self.vocab_multiple)
        for name, value, valid in (("ssm_mode", self.ssm_mode, SSM_MODES),
                                   ("ssm_init", self.ssm_init, INITS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {valid}")


class CausalGatedBlock(nnx.Module):
    """The BiGS gated block with the forward SSM only (module docstring); official names."""

    def __init__(self, c: BigsLMConfig, *, rngs: nnx.Rngs):
        d, f, dt = c.hidden_size, c.intermediate_size, jnp.dtype(c.dtype)
        kw = dict(rngs=rngs, init_std=c.init_std, dtype=dt)
        self.norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.dv = dense(d, f, ("embed", "mlp"), **kw)
        self.du_forward = dense(d, d, ("embed", "mlp"), **kw)
        self.fs4 = S4D(d, state_size=c.ssm_state, shared=c.ssm_shared, init=c.ssm_init,
                       dt_min=c.ssm_dt_min, dt_max=c.ssm_dt_max, rngs=rngs)
        self.duc_forward = dense(d, d, ("mlp", "embed"), **kw)
        self.dol = dense(d, f, ("embed", "mlp"), **kw)
        self.do = dense(f, d, ("mlp", "embed"), **kw)
        self.mode = resolve_mode(c.ssm_mode)

    def _inputs(self, x_BLD):
        """(V, F): the gate and the SSM input."""
        z_BLD = self.norm(x_BLD)
        return gelu_tanh(self.dv(z_BLD)), gelu_tanh(self.du_forward(z_BLD))

    def _outputs(self, x_BLD, v_BLF, y_BLD):
        h_BLF = gelu_tanh(self.dol(self.duc_forward(y_BLD)))
        return x_BLD + self.do(h_BLF * v_BLF)

    def __call__(self, x_BLD, mask_BL, segment_ids_BL=None, *, deterministic=True, rngs=None):
        del deterministic, rngs  # no dropout inside the block (as BiGS)
        v_BLF, f_BLD = self._inputs(x_BLD)
        y_BLD = self.fs4(f_BLD, mask_BL, mode=self.mode, segment_ids_BL=segment_ids_BL)
        return self._outputs(x_BLD, v_BLF, y_BLD)

    def prefill(self, x_BLD, lengths_B):
        """`__call__` on right-padded prompts; (output, SSM state after each prompt)."""
        mask_BL = jnp.arange(x_BLD.shape[1])[None, :] < lengths_B[:, None]
        v_BLF, f_BLD = self._inputs(x_BLD)
        y_BLD = self.fs4(f_BLD, mask_BL, mode=self.mode)
        return self._outputs(x_BLD, v_BLF, y_BLD), self.fs4.final_state(f_BLD, lengths_B)

    def decode(self, x_BD, state_BDN, recurrence):
        """One token per row: (output (B, D), new state); O(D² + D·N), no context term."""
        v_BF, f_BD = self._inputs(x_BD)
        state_BDN, y_BD = self.fs4.step(state_BDN, f_BD, recurrence)
        return self._outputs(x_BD, v_BF, y_BD), state_BDN


class Embeddings(nnx.Module):
    """The token table alone, at GPT-2's path `embeddings/word` (freeze specs, growth)."""

    def __init__(self, c: BigsLMConfig, *, rngs: nnx.Rngs):
        self.word = embed(padded_vocab(c.vocab_size, c.vocab_multiple), c.hidden_size,
                          ("vocab", "embed"), init_std=c.init_std, rngs=rngs,
                          dtype=jnp.dtype(c.dtype))


class BigsLM(nnx.Module):
    """Token embeddings → `num_layers` causal gated blocks → final LayerNorm → LM head."""

    def __init__(self, config: BigsLMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        dt = jnp.dtype(c.dtype)
        self.embeddings = Embeddings(c, rngs=rngs)
        self.dropout = nnx.Dropout(c.dropout)
        self.layers = nnx.List([CausalGatedBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = layer_norm(c.hidden_size, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.lm_head = nnx.data(None if c.tie_word_embeddings else dense(
            c.hidden_size, padded_vocab(c.vocab_size, c.vocab_multiple), ("embed", "vocab"),
            rngs=rngs, init_std=c.init_std, use_bias=False, dtype=dt))

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
          input_ids: (B, L) int token ids (any L: nothing is tied to max_len).
          attention_mask: (B, L), 1 for real tokens and 0 for pads: pads are zeroed at every
            SSM input (right pads cannot reach real tokens of a causal model anyway).
          inputs_embeds: (B, L, D) token embeddings to use instead of `input_ids`.
          segment_ids: (B, L) packed rows: each SSM restarts at every segment start.
          positions: accepted for packed batches and unused (no position embeddings).
          deterministic: disable dropout.
          rngs: dropout randomness when not deterministic.

        Returns:
          ModelOutput with hidden_states (B, L, D) after the final LayerNorm and fp32
          logits (B, L, C).
        """
        del positions
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            x_BLD = self.embeddings.word(jnp.asarray(input_ids))
        else:
            x_BLD = jnp.asarray(inputs_embeds)
        x_BLD = self.dropout(x_BLD, deterministic=deterministic, rngs=rngs)
        mask_BL = None if attention_mask is None else jnp.asarray(attention_mask)
        seg_BL = None if segment_ids is None else jnp.asarray(segment_ids)
        x_BLD = run_layers(self.layers, x_BLD, mask_BL, seg_BL, rngs=rngs,
                           remat=self.config.remat, deterministic=deterministic,
                           scan=self.config.scan_layers)
        h_BLD = self.final_norm(x_BLD)
        return ModelOutput(hidden_states=h_BLD, logits=self.logits(h_BLD))

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        """fp32 LM logits (..., C) of final hidden states (..., D); the rows of a padded
        vocabulary (`vocab_multiple`) get `PAD_LOGIT`."""
        out = jnp.promote_types(h_BLD.dtype, "float32")
        if self.lm_head is None:
            w_CD = self.embeddings.word.embedding[...]
            logits = jnp.einsum("...D,CD->...C", h_BLD, w_CD.astype(h_BLD.dtype),
                                preferred_element_type=out)
        else:
            logits = jnp.einsum("...D,DC->...C", h_BLD,
                                self.lm_head.kernel[...].astype(h_BLD.dtype),
                                preferred_element_type=out)
        return mask_pad_logits(logits, self.config.vocab_size)

    # ------------------------------------------------------------ decoding (bigs_jax.generation)
    # The cache is each layer's SSM state (B, D, N), whatever the cache length; the discretized
    # (A_bar, B_bar, C) of every layer are computed once per generate call (decode_constants).

    def init_cache(self, batch: int, length: int) -> list[jax.Array]:
        """Zero SSM states, one (batch, D, N) per layer; `length` does not matter."""
        del length
        return [layer.fs4.init_state(batch) for layer in self.layers]

    def decode_constants(self, length: int) -> list[tuple]:
        del length
        return [layer.fs4.recurrence() for layer in self.layers]

    def prefill(self, ids_BL: jax.Array, lengths_B: jax.Array, cache: list[jax.Array]):
        """Right-padded prompts (row b's tokens at 0..lengths_B[b]-1) by the parallel path;
        returns (fp32 next-token logits (B, C) after each prompt, the SSM states)."""
        del cache  # every state is recomputed from the prompt
        x_BLD = self.embeddings.word(ids_BL)
        states = []
        for layer in self.layers:
            x_BLD, state_BDN = layer.prefill(x_BLD, lengths_B)
            states.append(state_BDN)
        h_BD = self.final_norm(x_BLD[jnp.arange(x_BLD.shape[0]), lengths_B - 1])
        return self.logits(h_BD), states

    def decode_step(self, ids_B: jax.Array, pos_B: jax.Array, cache: list[jax.Array],
                    consts: list[tuple]):
        """One new token per row (its position `pos_B` plays no part); returns (fp32
        next-token logits (B, C), the new states)."""
        del pos_B
        x_BD = self.embeddings.word(ids_B)
        states = []
        for layer, state_BDN, recurrence in zip(self.layers, cache, consts):
            x_BD, state_BDN = layer.decode(x_BD, state_BDN, recurrence)
            states.append(state_BDN)
        return self.logits(self.final_norm(x_BD)), states


# ---------------------------------------------------------------------------- registry

FAMILY = "bigs_lm"
# The S4D parameters: the kernel is computed from them in float32 and is sensitive to Δ·A.
FP32_PARAMS = (r"(^|/)fs4/",)
Config = BigsLMConfig
Model = BigsLM

# No released causal BiGS exists; the sizes pair GPT-2's widths and depths with the BiGS gate
# width F = 3·D (official BiGS: 1024 -> 3072). A causal layer then holds 2 D² + 3 D·F = 11 D²
# weights next to GPT-2's 12 D², so each size is GPT-2's counterpart less ~8% of its layer
# weights; N = 64 as BiGS (16 in the tiny test size).
_LM = dict(vocab_size=50257, dropout=0.0)
SIZES: dict[str, dict] = {
    "bigs-lm-tiny": dict(_LM, hidden_size=64, num_layers=2, intermediate_size=192,
                         ssm_state=16, max_len=128),
    "bigs-lm-mini": dict(_LM, hidden_size=256, num_layers=4, intermediate_size=768,
                         max_len=256),
    "bigs-lm-small": dict(_LM, hidden_size=768, num_layers=12, intermediate_size=2304,
                          max_len=1024),
    "bigs-lm-medium": dict(_LM, hidden_size=1024, num_layers=24, intermediate_size=3072,
                           max_len=1024),
}
