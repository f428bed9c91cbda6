"""Chunking, causal-LM shift and BERT masking, checked against the raw token stream."""

import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from bigs_jax.data import bpe, corpus, preprocessors, tasks, vocab

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


def _gpt2_layout_bpe(path):
    """A byte-level BPE in GPT-2's layout and id order (no merges): ids 0..255 are the 256
    byte characters in GPT-2's byte-to-unicode order, so "!" is 0 as in GPT-2; 256 is
    <|endoftext|>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    vocab_json = {c: i for i, c in enumerate(chars)}
    vocab_json[bpe.END_OF_TEXT] = 256
    (path / "vocab.json").write_text(json.dumps(vocab_json), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return bpe.ByteLevelBPEVocabulary(path)


@pytest.mark.parametrize("pack", [False, True])
def test_gpt2_bpe_lm_rows_keep_weight_on_exclamation_marks(tmp_path, pack):
    """GPT-2's id 0 is "!": LM rows (chunked or packed) keep loss weight 1 and attention on
    every "!", and give weight 0 only to real padding. (Packed rows also lost the tokens after
    a "!": SeqIO's packer cut each example at its count of nonzero ids.)"""
    vocabulary = _gpt2_layout_bpe(tmp_path)
    assert vocabulary.encode("Hi!") == [ord("H") - 33, ord("i") - 33, 0]
    docs = ["Hi! Wow!!", "Stop!"]
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
            {"text": docs}), splits=("train",))
    task = tasks.register_text_task(f"test_gpt2_bang_lm_{int(pack)}", source, objective="lm",
                                    vocabulary=vocabulary, pack=pack)
    rows = list(task.get_dataset({"input_ids": 6, "labels": 6}, split="train", shuffle=False,
                                 num_epochs=1).as_numpy_iterator())
    eot = vocabulary.end_of_text_id
    stream = [t for d in docs for t in vocabulary.encode(d) + [eot]]  # 16 tokens
    assert [i for i, t in enumerate(stream) if t == 0] == [2, 7, 8, 14]
    weights = np.concatenate([r["loss_weights"] for r in rows])
    labels = np.concatenate([r["labels"] for r in rows])
    mask = np.concatenate([r["attention_mask"] for r in rows])
    inputs = np.concatenate([r["input_ids"] for r in rows])
    assert ((weights > 0) <= (mask > 0)).all()  # a row's last real token has no target
    # Rows (or, packed, document pieces) of 7 tokens: the first token of each is no target.
    starts = (0, 7, 10) if pack else (0, 7, 14)
    want = [t for i, t in enumerate(stream) if i not in starts]
    assert sorted(labels[weights > 0]) == sorted(want)  # the "!" at 8 and 14 among them
    assert ((inputs == 0) & (mask > 0)).sum() == 4  # every "!" is context for what follows
    assert (weights == 0).sum() >= 5 and (labels[weights == 0] == 0).all()  # pads: 0, weight 0
    if not pack:  # the chunked stream in order, the last row padded after 2 real tokens
        assert len(rows) == 3
        np.testing.assert_array_equal(mask[-6:], [1, 1, 0, 0, 0, 0])
        np.testing.assert_array_equal(weights[-6:], [1, 0, 0, 0, 0, 0])
        real = np.concatenate([np.append(r["input_ids"][r["attention_mask"] > 0],
                                         r["labels"][-1:] if r["attention_mask"].all() else [])
                               for r in rows])
        np.testing.assert_array_equal(real, stream)
