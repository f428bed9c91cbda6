"""One train step of a fixed tiny model per family, pinned to golden numbers.

Each family gets a fixed tiny model (seed 0), a fixed batch (numpy seed 0, padded rows
included) and one jitted `step.make_train_step` with plain SGD, whose update is the gradient
itself, so the parameters after the step depend on every gradient entry (Adam's first step
would see only their signs). The loss, the global gradient norm and the parameter norm after
the step are pinned to values recorded once on CPU in float32 (twice, in two processes, with
identical results). A change to an initializer, a forward pass, a loss or the step's wiring
moves at least one of them; a refactor that should change nothing leaves them within 1e-5.
Dropout is off: its masks are tested elsewhere, and its random bits triple the compile time.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.train import objectives, step

B, L, V = 4, 16, 101
TEXT = dict(vocab_size=V, hidden_size=32, num_layers=2, max_len=L, dropout=0.0)
IMAGE = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_labels=10,
             head_zero_init=False, dropout=0.0)
NO_ATTENTION_DROPOUT = dict(attention_dropout=0.0)

# family: (registry name, overrides, objective)
CASES = {
    "bert": ("bert-tiny", dict(TEXT, **NO_ATTENTION_DROPOUT, intermediate_size=64, num_heads=4),
             "mlm"),
    "bigs": ("bigs-tiny", dict(TEXT, **NO_ATTENTION_DROPOUT, intermediate_size=64, num_heads=4,
                               ssm_state=8), "mlm"),
    "gpt2": ("gpt2-tiny", dict(TEXT, **NO_ATTENTION_DROPOUT, num_heads=4), "lm"),
    "m2-bert": ("m2-bert-tiny", dict(TEXT, intermediate_size=64, filter_order=8), "mlm"),
    "m2-gpt": ("m2-gpt-tiny", dict(TEXT, intermediate_size=64, filter_order=8), "lm"),
    "vit": ("vit-tiny", dict(IMAGE, **NO_ATTENTION_DROPOUT, num_layers=2, num_heads=4,
                             intermediate_size=64), "classification"),
    "m2-vit": ("m2-vit-tiny", dict(IMAGE, num_layers=2, intermediate_size=64, filter_order=8),
               "classification"),
}

# (loss, gradient norm, parameter norm after the step), float32 on CPU, jax 0.10.2.
GOLDEN = {
    "bert": (4.639135837554932, 3.146674156188965, 14.242803573608398),
    "bigs": (4.613404273986816, 2.96744966506958, 60.253440856933594),
    "gpt2": (4.636009216308594, 1.6686426401138306, 12.994606971740723),
    "m2-bert": (4.579991340637207, 9.02715015411377, 63.21625900268555),
    "m2-gpt": (4.640268802642822, 2.283367872238159, 62.09006881713867),
    "m2-vit": (2.2797927856445312, 2.8084716796875, 30.804006576538086),
    "vit": (2.2420666217803955, 6.851306438446045, 13.368863105773926),
}
RTOL = 1e-5
LR = 0.5


def batch(objective):
    rng = np.random.default_rng(0)
    if objective == "classification":
        return {"image": rng.normal(size=(B, 8, 8, 1)).astype(np.float32),
                "labels": rng.integers(0, 10, B).astype(np.int32)}
    mask = np.ones((B, L), np.int32)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    ids = np.where(mask, rng.integers(5, V, (B, L)), 0).astype(np.int32)
    if objective == "lm":
        labels = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
        weights = mask * np.concatenate([mask[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "loss_weights": weights.astype(np.float32)}
    selected = (rng.random((B, L)) < 0.3) & (mask == 1)
    return {"input_ids": np.where(selected, 4, ids).astype(np.int32), "attention_mask": mask,
            "token_type_ids": (np.arange(L)[None] >= L // 2).astype(np.int32) * mask,
            "labels": np.where(selected, ids, 0).astype(np.int32),
            "loss_weights": selected.astype(np.float32)}


def one_step(family):
    name, overrides, objective = CASES[family]
    graphdef, state = nnx.split(bigs_jax.create(name, seed=0, **overrides))
    params = nnx.to_pure_dict(state)
    tx = optax.sgd(LR)
    init = step.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
    loss_fn = functools.partial(getattr(objectives, objective), max_predictions=0)
    new, stats = jax.jit(step.make_train_step(graphdef, tx, loss_fn))(init, batch(objective))
    return (float(stats["loss"]), float(stats["grad_norm"]),
            float(optax.tree.norm(new.params)))


@pytest.mark.parametrize("family", sorted(CASES))
def test_one_step_matches_golden_values(family):
    got = one_step(family)
    loss, grad_norm, param_norm = got
    assert np.isfinite(got).all() and grad_norm > 1e-3, got  # not a dead step
    np.testing.assert_allclose(got, GOLDEN[family], rtol=RTOL,
                               err_msg=f"{family}: (loss, grad_norm, param_norm) = {got!r}")
