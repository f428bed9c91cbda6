"""Chunking, causal-LM shift and BERT masking, checked against the raw token stream."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from bigs_jax.data import corpus, preprocessors, tasks, vocab

SPECIALS = vocab.embedded_special_ids()
L = 128


def _task_rows(task_name, split, seq_len=L):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(
        {k: seq_len for k in task.output_features}, split=split, shuffle=False, num_epochs=1
    )
    return list(ds.as_numpy_iterator())


def _stream(split):
    """Token stream the chunkers must cut: each document's ids followed by [SEP]."""
    sv = vocab.embedded_vocabulary()
    return np.concatenate([sv.encode(d.text) + [SPECIALS.sep_id] for d in corpus.documents(split)])


def test_mlm_rows_are_cls_chunk_sep_and_cover_the_stream():
    rows = np.stack([r["input_ids"] for r in _task_rows(tasks.EMBEDDED_MLM, "validation")])
    stream = _stream("validation")
    assert rows.shape == (int(np.ceil(len(stream) / (L - 2))), L)
    assert (rows[:, 0] == SPECIALS.cls_id).all()
    lengths = (rows != 0).sum(1)
    assert (lengths[:-1] == L).all() and 3 <= lengths[-1] <= L
    assert (rows[np.arange(len(rows)), lengths - 1] == SPECIALS.sep_id).all()
    inner = np.concatenate([r[1 : n - 1] for r, n in zip(rows, lengths, strict=True)])
    np.testing.assert_array_equal(inner, stream)


def test_lm_rows_shift_by_one_and_cover_the_stream():
    rows = _task_rows(tasks.EMBEDDED_LM, "validation")
    stream = _stream("validation")
    assert len(rows) == int(np.ceil(len(stream) / (L + 1)))
    for r in rows:
        np.testing.assert_array_equal(r["labels"][:-1], r["input_ids"][1:])
        np.testing.assert_array_equal(r["loss_weights"], (r["labels"] != 0).astype(np.float32))
        np.testing.assert_array_equal(r["attention_mask"], (r["input_ids"] != 0).astype(np.int32))
    full = np.concatenate([np.append(r["input_ids"], r["labels"][-1]) for r in rows])
    np.testing.assert_array_equal(full[: len(stream)], stream)
    assert (full[len(stream) :] == 0).all()
    # Rows do not overlap: the first token of each row is never a target.
    assert sum(r["loss_weights"].sum() for r in rows) == len(stream) - len(rows)


@pytest.fixture(scope="module")
def masked_two_epochs():
    """Train rows (2,915 x 128, ~370k tokens) repeated twice, masked after the repeat."""
    originals = np.stack([r["input_ids"] for r in _task_rows(tasks.EMBEDDED_MLM, "train")])
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": originals}).repeat(2)
    ds = preprocessors.bert_mlm(ds, specials=SPECIALS, seed=1234)
    out = {k: np.stack(v) for k, v in _stack(ds).items()}
    return np.concatenate([originals, originals]), out


def _stack(ds):
    cols = {}
    for ex in ds.as_numpy_iterator():
        for k, v in ex.items():
            cols.setdefault(k, []).append(v)
    return cols


def test_bert_masking_statistics(masked_two_epochs):
    orig, out = masked_two_epochs
    selectable = ~np.isin(orig, SPECIALS.all)
    selected = out["loss_weights"] > 0
    assert selectable.sum() > 140_000
    assert abs(selected.sum() / selectable.sum() - 0.15) < 0.005
    assert not (selected & ~selectable).any()  # never [CLS], [SEP], [PAD], [UNK], [MASK]
    np.testing.assert_array_equal(out["labels"], np.where(selected, orig, 0))
    assert set(np.unique(out["loss_weights"])) == {0.0, 1.0}
    np.testing.assert_array_equal(out["input_ids"][~selected], orig[~selected])
    inp, ref = out["input_ids"][selected], orig[selected]
    masked = inp == SPECIALS.mask_id
    randomized = (inp != ref) & ~masked
    kept = inp == ref
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(randomized.mean() - 0.1) < 0.01
    assert abs(kept.mean() - 0.1) < 0.01
    assert not np.isin(inp[randomized], SPECIALS.all).any()
    assert inp.max() < SPECIALS.vocab_size
    # Random replacements spread over the vocabulary, not a few ids.
    assert len(np.unique(inp[randomized])) > 1000
    np.testing.assert_array_equal(out["attention_mask"], (orig != 0).astype(np.int32))
    assert not out["token_type_ids"].any()


def test_masks_differ_between_epochs(masked_two_epochs):
    orig, out = masked_two_epochs
    n = len(orig) // 2
    first, second = out["loss_weights"][:n], out["loss_weights"][n:]
    differ = (first != second).any(axis=1)
    assert differ.mean() > 0.99


def test_mask_is_a_function_of_seed_and_index():
    ids = tf.constant(_stream("validation")[:L], tf.int32)

    def mask(seed, index):
        return preprocessors.mask_tokens(
            ids, preprocessors.example_key(seed, index), specials=SPECIALS
        )["input_ids"].numpy()

    np.testing.assert_array_equal(mask(7, 3), mask(7, 3))
    assert (mask(7, 3) != mask(7, 4)).any()
    assert (mask(7, 3) != mask(8, 3)).any()


def test_mask_rate_is_configurable():
    orig = np.stack([r["input_ids"] for r in _task_rows(tasks.EMBEDDED_MLM, "train")])
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": orig})
    out = _stack(preprocessors.bert_mlm(ds, specials=SPECIALS, seed=0, mask_rate=0.3))
    selected = np.stack(out["loss_weights"]) > 0
    assert abs(selected.sum() / (~np.isin(orig, SPECIALS.all)).sum() - 0.3) < 0.01


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="mask_rate must be in"):
        preprocessors.mask_tokens(
            tf.zeros([4], tf.int32), tf.zeros([2], tf.int64), specials=SPECIALS, mask_rate=1.5
        )
    with pytest.raises(ValueError, match="seq_len >= 3"):
        _task_rows(tasks.EMBEDDED_MLM, "validation", seq_len=2)
