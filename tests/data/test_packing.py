"""Packing: rows built by the real preprocessors, and no leakage between packed examples.

A packed row (segment ids + per-segment positions) must give every example exactly the
per-example loss it gets alone in a padded row: attention by segment masks (BERT, GPT-2), the
SSM by its segment-aware path (BiGS: both directions, FFT and scan modes). M2 refuses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

import bigs_jax
from bigs_jax.data import preprocessors

L = 32
LENGTHS = [7, 12, 5, 20, 9, 3, 30, 14, 11]  # several segments per row, some rows nearly full


def _examples(vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab_size, n).astype(np.int32) for n in LENGTHS]


def _packed_rows(examples):
    ds = tf.data.Dataset.from_generator(
        lambda: ({"input_ids": e} for e in examples),
        output_signature={"input_ids": tf.TensorSpec([None], tf.int32)})
    rows = list(preprocessors.pack(ds, {"input_ids": L}).as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_pack_keeps_every_example_whole_with_restarting_positions():
    examples = _examples(1000)
    rows = _packed_rows(examples)
    assert rows["input_ids"].shape[0] < len(examples)  # something was packed
    found = []
    for ids, seg, pos in zip(rows["input_ids"], rows["segment_ids"], rows["positions"],
                             strict=True):
        assert ((seg > 0) == (ids > 0)).all()
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            assert (np.diff(where) == 1).all()  # contiguous
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            found.append(ids[where])
    assert sorted(map(tuple, found)) == sorted(map(tuple, examples))


def _per_example_losses(model, rows, examples, causal):
    """(packed, unpacked) mean CE per example, labels = the next (causal) or same token."""
    def ce(logits, ids):
        labels = np.roll(ids, -1) if causal else ids
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels)

    packed = {}
    out = model(rows["input_ids"], attention_mask=(rows["segment_ids"] > 0).astype(np.int32),
                segment_ids=rows["segment_ids"], positions=rows["positions"])
    for b, (ids, seg) in enumerate(zip(rows["input_ids"], rows["segment_ids"], strict=True)):
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            n = len(where) - 1 if causal else len(where)
            packed[tuple(ids[where])] = float(
                ce(out.logits[b, where], ids[where])[:n].mean())
    alone = {}
    batch = np.zeros((len(examples), L), np.int32)
    for i, e in enumerate(examples):
        batch[i, : len(e)] = e
    out = model(batch, attention_mask=(batch > 0).astype(np.int32))
    for i, e in enumerate(examples):
        n = len(e) - 1 if causal else len(e)
        alone[tuple(e)] = float(ce(out.logits[i, : len(e)], e)[:n].mean())
    return packed, alone


@pytest.mark.parametrize("name,causal,overrides", [
    ("bert-tiny", False, {}),
    ("gpt2-tiny", True, {}),
    ("bigs-tiny", False, {}),
    pytest.param("bigs-tiny", False, {"ssm_mode": "scan"}, marks=pytest.mark.slow),
    pytest.param("stack-ssm-tiny", False, {}, marks=pytest.mark.slow),
])
def test_packed_losses_equal_unpacked(name, causal, overrides):
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        model = bigs_jax.create(name, max_len=L, vocab_size=1000, **overrides)
        examples = _examples(1000)
        packed, alone = _per_example_losses(model, _packed_rows(examples), examples, causal)
    finally:
        jax.config.update("jax_default_matmul_precision", None)
    assert packed.keys() == alone.keys() and len(alone) == len(examples)
    diff = max(abs(packed[k] - alone[k]) for k in alone)
    assert diff < 1e-5, diff
    assert np.std(list(alone.values())) > 1e-3  # the losses differ between examples


def test_m2_refuses_packed_rows():
    model = bigs_jax.create("m2-bert-tiny", max_len=L, vocab_size=1000)
    ids = np.ones((1, L), np.int32)
    with pytest.raises(ValueError, match="M2 cannot keep packed examples apart.*drop pack=1"):
        model(ids, segment_ids=ids, positions=np.zeros_like(ids))


def test_bucket_by_length_pads_to_the_bound_and_keeps_every_example():
    lengths = [3, 17, 8, 30, 1, 12, 16, 9, 25, 4, 31, 2]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"input_ids": np.arange(1, n + 1, dtype=np.int32),
                  "token_type_ids": np.ones(n, np.int32)} for n in lengths),
        output_signature={k: tf.TensorSpec([None], tf.int32)
                          for k in ("input_ids", "token_type_ids")})
    batches = list(preprocessors.bucket_by_length(
        ds, boundaries=[8, 16, 32], batch_size=2).as_numpy_iterator())
    seen = []
    for b in batches:
        bound = b["input_ids"].shape[1]
        n = (b["input_ids"] > 0).sum(1)
        assert bound in (8, 16, 32) and b["token_type_ids"].shape == b["input_ids"].shape
        assert (n <= bound).all() and (bound == 8 or (n > {16: 8, 32: 16}[bound]).all())
        np.testing.assert_array_equal(b["token_type_ids"].sum(1), n)
        seen += n.tolist()
    assert sorted(seen) == sorted(lengths)
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the last bucket"):
        list(preprocessors.bucket_by_length(ds, boundaries=[8, 16], batch_size=2))
