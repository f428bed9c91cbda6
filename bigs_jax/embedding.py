"""Sentence embeddings: an encoder's final hidden states pooled the way sentence-transformers
pools them (github.com/UKPLab/sentence-transformers, `models.Pooling` and `models.Normalize`).

    model = bigs_jax.load("MINILM")             # converted from a sentence-transformers directory
    emb_BE = bigs_jax.embed(model, ids_BL, mask_BL)   # = SentenceTransformer(dir).encode(...)

A workdir converted from a sentence-transformers directory keeps that model's pooling in
`pooling.json`, and `bigs_jax.load` attaches it to the model it returns (`model.pooling`);
other models pool by masked mean without normalization (sentence-transformers' default).
Dimension key: B batch, L length, D hidden, E embedding (D times the number of modes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

POOLING_JSON = "pooling.json"
# sentence-transformers' pooling modes, in the order it concatenates the legacy flags.
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers clamps token counts at 1e-9 and normalizes with F.normalize (1e-12).
_MIN_COUNT, _MIN_NORM = 1e-9, 1e-12


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How to pool hidden states into one vector per sequence.

    Attributes:
      modes: one or more of `MODES`; several are concatenated in the given order.
      normalize: L2-normalize the pooled vector (sentence-transformers' `Normalize` module).
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    def __post_init__(self):
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        object.__setattr__(self, "modes", modes)
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"unknown pooling mode(s) {bad or modes}; choose from {MODES}")


def write_pooling(workdir: str, pooling: Pooling) -> None:
    with open(os.path.join(workdir, POOLING_JSON), "w") as f:
        json.dump(dataclasses.asdict(pooling), f, indent=2)
        f.write("\n")


def read_pooling(workdir: str) -> Optional[Pooling]:
    """The pooling recorded in `workdir/pooling.json`, or None if it has none."""
    path = os.path.join(workdir, POOLING_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            data = json.load(f)
            return Pooling(modes=tuple(data["modes"]), normalize=bool(data["normalize"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a pooling record ({e}); delete it to pool by "
                             "mean, or reconvert the model") from None


def pool(h_BLD: jax.Array, mask_BL: jax.Array, pooling: Pooling = Pooling()) -> jax.Array:
    """(B, E) float32 sentence vectors of hidden states, over the positions where mask is 1."""
    h_BLD = jnp.asarray(h_BLD, jnp.float32)
    m_BL1 = jnp.asarray(mask_BL, jnp.float32)[..., None]
    L = h_BLD.shape[1]
    count_B1 = jnp.maximum(m_BL1.sum(axis=1), _MIN_COUNT)
    out = []
    for mode in pooling.modes:
        if mode == "cls":  # the first real token (index 0 for right padding)
            first_B = jnp.argmax(mask_BL, axis=1)
            out.append(jnp.take_along_axis(h_BLD, first_B[:, None, None], axis=1)[:, 0])
        elif mode == "max":
            out.append(jnp.where(m_BL1 > 0, h_BLD, -jnp.inf).max(axis=1))
        elif mode == "mean":
            out.append((h_BLD * m_BL1).sum(axis=1) / count_B1)
        elif mode == "mean_sqrt_len_tokens":
            out.append((h_BLD * m_BL1).sum(axis=1) / jnp.sqrt(count_B1))
        elif mode == "weightedmean":  # position weights 1..L
            w_BL1 = m_BL1 * jnp.arange(1, L + 1, dtype=jnp.float32)[None, :, None]
            out.append((h_BLD * w_BL1).sum(axis=1)
                       / jnp.maximum(w_BL1.sum(axis=1), _MIN_COUNT))
        else:  # lasttoken: the last real token (position 0 if there is none)
            last_B = L - 1 - jnp.argmax(jnp.asarray(mask_BL)[:, ::-1], axis=1)
            last_B = jnp.where(jnp.asarray(mask_BL).max(axis=1) > 0, last_B, 0)
            out.append(jnp.take_along_axis(h_BLD, last_B[:, None, None], axis=1)[:, 0])
    e_BE = jnp.concatenate(out, axis=-1)
    if pooling.normalize:
        norm_B1 = jnp.linalg.norm(e_BE, axis=-1, keepdims=True)
        e_BE = e_BE / jnp.maximum(norm_B1, _MIN_NORM)
    return e_BE


def embed(model: nnx.Module, input_ids, attention_mask=None, token_type_ids=None, *,
          pooling: Union[Pooling, str, Sequence[str], None] = None) -> jax.Array:
    """(B, E) sentence embeddings of a batch of token ids.

    Args:
      model: any model whose output has `hidden_states` (encoders, M2, decoders).
      input_ids: (B, L) int ids; attention_mask: (B, L), 1 on real tokens (default all 1);
        token_type_ids: (B, L) or None.
      pooling: a `Pooling`, a mode name or names from `MODES`, or None for the model's own
        (`model.pooling`, set by `bigs_jax.load` from the workdir; else mean, unnormalized).
    """
    if pooling is None:
        pooling = getattr(model, "pooling", None) or Pooling()
    elif not isinstance(pooling, Pooling):
        pooling = Pooling(modes=pooling)
    ids_BL = jnp.asarray(input_ids)
    mask_BL = jnp.ones(ids_BL.shape, jnp.int32) if attention_mask is None else jnp.asarray(
        attention_mask)
    kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    out = model(ids_BL, attention_mask=mask_BL, **kwargs)
    return pool(out.hidden_states, mask_BL, pooling)
