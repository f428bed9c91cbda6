"""Training objectives. Each returns sums, not means, so microbatches add up exactly:

    loss_fn(model, batch, *, deterministic, rngs) -> (loss_sum, weight_sum, extra)

The step divides the summed loss and gradients by the summed weight of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _packing(batch) -> dict:
    """`segment_ids` and `positions` of packed batches (data.preprocessors.pack), else none."""
    return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


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
                mlm_positions=positions, deterministic=deterministic, rngs=rngs,
                **_packing(batch))
    ce_BP = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels_BP)
    total = weights_BP.sum()
    return (ce_BP * weights_BP).sum(), total, {"dropped": weights_BL.sum() - total}


def lm(model, batch, *, deterministic: bool, rngs, max_predictions: int = 0):
    """Next-token cross-entropy at positions with loss_weights > 0 (causal LM)."""
    del max_predictions
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                deterministic=deterministic, rngs=rngs, **_packing(batch))
    weights_BL = batch["loss_weights"]
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["labels"])
    return (ce_BL * weights_BL).sum(), weights_BL.sum(), {}


def forward(model, batch, *, deterministic: bool, rngs):
    """The model on a batch of images (`image`) or of token ids (`input_ids` + masks)."""
    if "image" in batch:
        return model(batch["image"], deterministic=deterministic, rngs=rngs)
    if "inputs" in batch:  # token features or ids of wrapper models (bigs_jax.fpt)
        return model(batch["inputs"], batch.get("attention_mask"),
                     deterministic=deterministic, rngs=rngs)
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                 deterministic=deterministic, rngs=rngs)


def _example_weights(batch) -> jax.Array:
    """Per-example weights (B,): `example_weights` if given (0 for padding rows), else 1."""
    labels = batch["labels"]
    return batch.get("example_weights", jnp.ones(labels.shape[:1], jnp.float32))


def classification(model, batch, *, deterministic: bool, rngs, max_predictions: int = 0):
    """Cross-entropy of the classification head's (B, C) logits against integer `labels` (B,).

    Models that make T predictions per example (FPT's bit tasks) give (B, T, C) logits and
    (B, T) labels: every prediction counts once, so loss and accuracy are per prediction.
    Extra sums: `accuracy` (correct predictions; the loop divides by the weight).
    """
    del max_predictions
    logits_BC = forward(model, batch, deterministic=deterministic, rngs=rngs).logits
    logits_BC = logits_BC.astype(jnp.float32)
    w_B = _example_weights(batch)
    labels = batch["labels"]
    w_B = jnp.broadcast_to(w_B.reshape(w_B.shape + (1,) * (labels.ndim - 1)), labels.shape)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
    correct_B = (jnp.argmax(logits_BC, axis=-1) == batch["labels"]).astype(jnp.float32)
    return (ce_B * w_B).sum(), w_B.sum(), {"accuracy": (correct_B * w_B).sum()}


def regression(model, batch, *, deterministic: bool, rngs, max_predictions: int = 0):
    """Squared error of a one-output head against float `labels` (B,) (e.g. STS-B)."""
    del max_predictions
    logits_BC = forward(model, batch, deterministic=deterministic, rngs=rngs).logits
    w_B = _example_weights(batch)
    se_B = jnp.square(logits_BC[:, 0].astype(jnp.float32) - batch["labels"])
    return (se_B * w_B).sum(), w_B.sum(), {}


OBJECTIVES: dict[str, Callable] = {"mlm": mlm, "lm": lm, "classification": classification,
                                   "regression": regression}
