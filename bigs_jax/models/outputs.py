"""What every model in the zoo returns."""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ModelOutput:
    """Outputs of a model call.

    Attributes:
        hidden_states: (B, L, D) final encoder/decoder states.
        logits: (B, L, C) for LM heads, (B, num_labels) for classification heads,
          None for a bare backbone.
        pooled: (B, D) pooled representation when the model has a pooler.
    """

    hidden_states: jax.Array
    logits: Optional[jax.Array] = None
    pooled: Optional[jax.Array] = None


# ---------------------------------------------------------------------------- dtype policy
# Every family's config has three dtypes: `param_dtype` (storage of the parameters and so of
# the optimizer moments), `dtype` (compute: matmul inputs, activations) and `output_dtype`
# (the logits handed to the loss). Numerically delicate parts (softmax, LayerNorm statistics,
# SSM kernels, FFT convolutions) run in float32 whatever the policy says.
# float64 needs jax_enable_x64; it exists for exactness tests (function-preserving growth).
DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_dtype_policy(config) -> None:
    """ValueError naming the field when a config's dtype policy holds an unknown dtype."""
    for field in ("param_dtype", "dtype", "output_dtype"):
        value = getattr(config, field)
        if value not in DTYPES:
            raise ValueError(f"unknown {field} {value!r}; choose one of {DTYPES}")


def with_output_dtype(call):
    """Decorates a model's `__call__`: logits come back in `self.config.output_dtype`."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        if out.logits is None:
            return out
        return out.replace(logits=out.logits.astype(self.config.output_dtype))

    return wrapper


def ids_or_embeds(input_ids, inputs_embeds, **per_token):
    """(ids_BL, None) or (None, embeds_BLD): exactly one of the two inputs; each array of
    `per_token` (attention_mask=..., token_type_ids=...) that is not None must be [B, L] like
    them: a mask of another shape would broadcast into wrong attention or fail deep inside."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    ids_BL = None if input_ids is None else jnp.asarray(input_ids)
    embeds_BLD = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
    BL = (ids_BL if embeds_BLD is None else embeds_BLD).shape[:2]
    for name, array in per_token.items():
        if array is not None and jnp.shape(array) != BL:
            given = "input_ids" if embeds_BLD is None else "inputs_embeds"
            raise ValueError(f"{name} has shape {jnp.shape(array)} but {given} is [batch, "
                             f"length] = {BL}; pass one {name} value per token, shape {BL}")
    return ids_BL, embeds_BLD
