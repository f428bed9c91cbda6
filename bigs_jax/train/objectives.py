"""Training objectives. Each returns sums, not means, so microbatches add up exactly:

    loss_fn(model, batch, *, deterministic, rngs) -> (loss_sum, weight_sum, extra)

The step divides the summed loss and gradients by the summed weight of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def mlm(model, batch, *, deterministic: bool, rngs, max_predictions: int = 0):
    """Cross-entropy at every selected position (loss_weights > 0) of a masked-LM batch.

    With `max_predictions` > 0 the logits are computed only at the `max_predictions`
    highest-weighted positions of each row (the selected ones first), as large-scale BERT
    trainers do; `dropped` counts selected positions that did not fit (it should stay 0).
    """
    weights_BL, labels_BL = batch["loss_weights"], batch["labels"]
    positions = None
    if max_predictions:
        weights_BP, positions = jax.lax.top_k(weights_BL, max_predictions)
        labels_BP = jnp.take_along_axis(labels_BL, positions, axis=1)
    else:
        weights_BP, labels_BP = weights_BL, labels_BL
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                mlm_positions=positions, deterministic=deterministic, rngs=rngs)
    ce_BP = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels_BP)
    total = weights_BP.sum()
    return (ce_BP * weights_BP).sum(), total, {"dropped": weights_BL.sum() - total}


def lm(model, batch, *, deterministic: bool, rngs, max_predictions: int = 0):
    """Next-token cross-entropy at positions with loss_weights > 0 (causal LM)."""
    del max_predictions
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                deterministic=deterministic, rngs=rngs)
    weights_BL = batch["loss_weights"]
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["labels"])
    return (ce_BL * weights_BL).sum(), weights_BL.sum(), {}


OBJECTIVES: dict[str, Callable] = {"mlm": mlm, "lm": lm}
