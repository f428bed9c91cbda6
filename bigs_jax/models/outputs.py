"""What every model in the zoo returns."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax


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
