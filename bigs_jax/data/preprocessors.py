"""Pretraining preprocessors: TF ops that run inside SeqIO tasks and tf.data pipelines.

Stages, in pipeline order:

- `chunk_for_mlm` / `chunk_for_lm` (SeqIO task preprocessors, deterministic): concatenate the
  tokenized documents with a [SEP] after each one, cut the token stream into fixed-size pieces
  and pad the last piece with 0. MLM rows are `[CLS] <seq_len - 2 tokens> [SEP]` (RoBERTa's
  "full sentences", no next-sentence prediction); LM rows hold seq_len + 1 tokens and their
  count of real ones (id 0 is "!" in GPT-2's BPE, so a pad cannot be told by its id).
- `causal_lm` (task preprocessor): LM rows -> inputs and next-token labels.
- Packed instead (`split_for_mlm` / `split_for_lm`, then `pack`): every document is cut into
  pieces of at most one row, each piece its own example, and examples are packed into rows
  with `segment_ids` (1, 2, ...; 0 on padding) and per-segment `positions`, so no example sees
  another: the models take `segment_ids=` and `positions=`.
- `bert_mlm` / `mask_tokens` (random, applied *after* the epoch repeat): BERT's masking with a
  loss on every selected position. Randomness is stateless and keyed on (seed, global example
  index), so a mask depends only on those two numbers: the same on every run and every host
  layout, and different each time the same row comes back in a later epoch (dynamic masking).
  Whole-word masking selects words instead of pieces (`word_start_table`).
- `bucket_by_length`: batches of variable-length examples padded to a bucket bound.

SeqIO's own `EncoderFeatureConverter` puts the MLM loss only where the input is [MASK], which
drops the 20% of selected positions that BERT leaves unchanged or randomizes; `mask_tokens`
emits explicit `loss_weights` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from bigs_jax.data import hide_accelerators_from_tensorflow, vocab

hide_accelerators_from_tensorflow()

PACKING_FEATURES = ("segment_ids", "positions")
NUM_TOKENS = "num_tokens"  # real tokens of an LM row (chunk_for_lm -> causal_lm)
MASK_FRACTION = 0.8  # of selected positions: replaced by [MASK]
RANDOM_FRACTION = 0.1  # of selected positions: replaced by a random regular token; rest kept


def _specials(output_features: Mapping[str, seqio.Feature], key: str) -> vocab.SpecialIds:
    return vocab.special_ids(output_features[key].vocabulary)


def _token_stream(dataset: tf.data.Dataset, key: str, sep_id: int) -> tf.data.Dataset:
    """Yields every token of every document in order, with [SEP] after each document."""
    sep = tf.constant([sep_id], tf.int32)
    return dataset.map(
        lambda ex: tf.concat([tf.cast(ex[key], tf.int32), sep], axis=0),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).unbatch()


def _pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
    # Pad id is 0 by construction (checked in vocab.special_ids); LM rows also carry their
    # real length, since 0 can be a real token there (byte-level BPE).
    return tf.pad(x, [[0, length - tf.shape(x)[0]]])


def chunk_for_mlm(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    key: str = "input_ids",
) -> tf.data.Dataset:
    """Concatenates tokenized documents into `[CLS] tokens [SEP]` rows of `sequence_length[key]`.

    Args:
        dataset: examples whose `key` holds one tokenized document (int ids, no specials).
        sequence_length: row length per feature; `sequence_length[key]` must be >= 3.
        output_features: SeqIO features; `output_features[key].vocabulary` gives the specials.
        key: the token feature.

    Returns:
        One example per row, `{key: int32 [L]}`; the last row is padded with 0.
    """
    length = sequence_length[key]
    if length < 3:
        raise ValueError(f"MLM rows need seq_len >= 3 ([CLS] x [SEP]), got {length}.")
    ids = _specials(output_features, key)
    cls = tf.constant([ids.cls_id], tf.int32)
    sep = tf.constant([ids.sep_id], tf.int32)
    chunks = _token_stream(dataset, key, ids.sep_id).batch(length - 2)
    return chunks.map(
        lambda c: {key: tf.ensure_shape(_pad_to(tf.concat([cls, c, sep], 0), length), [length])},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def chunk_for_lm(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    key: str = "input_ids",
) -> tf.data.Dataset:
    """Concatenates tokenized documents into rows of `sequence_length[key] + 1` tokens.

    [SEP] ends every document (GPT's end-of-text). The extra token per row is the last target
    of `causal_lm`; rows do not overlap, so one next-token target per row boundary is unused.

    Returns:
        One example per row, `{key: int32 [L + 1], NUM_TOKENS: int32 []}`: the last row is
        padded with 0, and `NUM_TOKENS` says how many of a row's tokens are real, because id 0
        is also a real token in some vocabularies (GPT-2's byte-level BPE: "!").
    """
    length = sequence_length[key] + 1
    ids = _specials(output_features, key)
    chunks = _token_stream(dataset, key, ids.sep_id).batch(length)
    return chunks.map(
        lambda c: {key: tf.ensure_shape(_pad_to(c, length), [length]),
                   NUM_TOKENS: tf.shape(c)[0]},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def causal_lm(dataset: tf.data.Dataset, key: str = "input_ids") -> tf.data.Dataset:
    """Turns rows of L + 1 tokens (`chunk_for_lm`'s) into next-token examples of length L.

    Padding is told by the row's `NUM_TOKENS`, never by the id: the pad id 0 is a real token
    of GPT-2's vocabulary ("!"), which must keep its loss and its place in the context.

    Returns:
        Examples with `input_ids` (the first L tokens), `labels` (the last L), `loss_weights`
        (float32, 1 where the label is a real token, 0 where it is padding) and
        `attention_mask` (int32, 1 on real input tokens).
    """
    if NUM_TOKENS not in dataset.element_spec:
        raise ValueError(f"causal_lm needs rows with a {NUM_TOKENS!r} count of real tokens, "
                         f"as chunk_for_lm makes them; run chunk_for_lm before causal_lm")

    def convert(ex):
        row = ex[key]
        real = tf.range(tf.shape(row)[0]) < ex[NUM_TOKENS]
        return {
            "input_ids": row[:-1],
            "labels": row[1:],
            "loss_weights": tf.cast(real[1:], tf.float32),
            "attention_mask": tf.cast(real[:-1], tf.int32),
        }

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def example_key(seed: int, index: tf.Tensor) -> tf.Tensor:
    """The stateless RNG key of one example: int64 [2] = (seed, global example index)."""
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}.")
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def mask_tokens(
    ids: tf.Tensor,
    key: tf.Tensor,
    *,
    specials: vocab.SpecialIds,
    mask_rate: float = 0.15,
    word_starts: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """BERT masking of one row of token ids.

    Every position that is not a special token ([PAD], [UNK], [CLS], [SEP], [MASK]) is selected
    independently with probability `mask_rate`; with `word_starts` (whole-word masking) every
    *word* is selected with that probability and all its pieces with it, so the expected
    fraction of selected tokens is still `mask_rate`. A selected position becomes [MASK] with
    probability 0.8, a uniformly drawn non-special id with probability 0.1 (which may equal the
    original, as in BERT), and stays unchanged otherwise. [UNK] is never selected: predicting it
    teaches nothing, and the embedded vocabulary never produces it (byte fallback).

    Args:
        ids: int32 [L] token ids, 0-padded.
        key: int64 [2] stateless RNG key, e.g. `example_key(seed, index)`.
        specials: the vocabulary's special ids and size.
        mask_rate: selection probability, in (0, 1).
        word_starts: bool [vocab_size] table, True for ids that begin a word (see
            `word_start_table`); None masks pieces independently.

    Returns:
        `input_ids` (corrupted), `labels` (original id where selected, else 0), `loss_weights`
        (float32, 1.0 at every selected position), `attention_mask` (int32, 1 on non-pad) and
        `token_type_ids` (int32 zeros), each [L].
    """
    if not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}.")
    ids = tf.cast(ids, tf.int32)
    special = tf.constant(specials.all, tf.int32)
    regular = tf.constant(
        [i for i in range(specials.vocab_size) if i not in specials.all], tf.int32
    )
    select_key, action_key, token_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    shape = tf.shape(ids)
    selectable = tf.reduce_all(ids[:, None] != special[None, :], axis=-1)
    draws = tf.random.stateless_uniform(shape, select_key)
    if word_starts is not None:
        # Word w of the row (counted from 0) uses draw w; specials start a word of their own.
        starts = tf.gather(word_starts, ids) | ~selectable
        draws = tf.gather(draws, tf.maximum(tf.cumsum(tf.cast(starts, tf.int32)) - 1, 0))
    selected = selectable & (draws < mask_rate)
    action = tf.random.stateless_uniform(shape, action_key)
    random_ids = tf.gather(
        regular,
        tf.random.stateless_uniform(
            shape, token_key, minval=0, maxval=regular.shape[0], dtype=tf.int32
        ),
    )
    corrupted = tf.where(
        action < MASK_FRACTION,
        specials.mask_id,
        tf.where(action < MASK_FRACTION + RANDOM_FRACTION, random_ids, ids),
    )
    return {
        "input_ids": tf.where(selected, corrupted, ids),
        "labels": tf.where(selected, ids, 0),
        "loss_weights": tf.cast(selected, tf.float32),
        "attention_mask": tf.cast(ids != specials.pad_id, tf.int32),
        "token_type_ids": tf.zeros_like(ids),
    }


def bert_mlm(
    dataset: tf.data.Dataset,
    *,
    specials: vocab.SpecialIds,
    seed: int,
    mask_rate: float = 0.15,
    key: str = "input_ids",
    index_key: str | None = None,
    word_starts: tf.Tensor | None = None,
) -> tf.data.Dataset:
    """Applies `mask_tokens` to every example of a dataset.

    Apply it after the repeat (`ds.repeat()` or SeqIO's `num_epochs`): masks are keyed on the
    example's position in the stream, so a row seen again in a later epoch gets a new mask.

    Args:
        dataset: examples with `key` = int [L] token ids (e.g. from `chunk_for_mlm`).
        specials: the vocabulary's special ids and size.
        seed: the run's seed.
        mask_rate: selection probability (0.15 in BERT; M2 uses 0.30).
        key: the token feature.
        index_key: feature holding each example's global index; None numbers the examples of
            `dataset` in order (0, 1, 2, ...), which is the global index when `dataset` is the
            whole repeated stream.
        word_starts: whole-word masking table (`word_start_table`), or None.

    Returns:
        The masked examples (see `mask_tokens`); `segment_ids` and `positions` of packed rows
        are kept, other features dropped.
    """
    if index_key is None:
        dataset = dataset.enumerate().map(lambda i, ex: {**ex, "_index": i})
        index_key = "_index"

    def mask(ex):
        out = mask_tokens(ex[key], example_key(seed, ex[index_key]), specials=specials,
                          mask_rate=mask_rate, word_starts=word_starts)
        return {**{k: ex[k] for k in PACKING_FEATURES if k in ex}, **out}

    return dataset.map(mask, num_parallel_calls=tf.data.AUTOTUNE)


def word_start_table(vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """bool [vocab_size]: which ids begin a word, for whole-word masking.

    WordPiece: every piece but the '##' continuations. SentencePiece: pieces with the '▁'
    word-boundary mark; byte pieces and other pieces continue the word before them. Special
    ids count as word starts (they are never selected).
    """
    specials = vocab.special_ids(vocabulary)
    pieces = getattr(vocabulary, "pieces", None)
    if pieces is not None:  # WordPiece
        starts = [not p.startswith("##") for p in pieces]
    else:
        sp = vocabulary.tokenizer
        starts = [sp.id_to_piece(i).startswith("\u2581") for i in range(specials.vocab_size)]
    for i in specials.all:
        starts[i] = True
    return tf.constant(starts, tf.bool)


def _document_chunks(dataset: tf.data.Dataset, key: str, size: int, suffix: list[int]):
    """Each document's ids (+ `suffix`) cut into pieces of at most `size`: one example each."""
    end = tf.constant(suffix, tf.int32)

    def chunks(ex):
        ids = tf.concat([tf.cast(ex[key], tf.int32), end], axis=0)
        return tf.data.Dataset.from_tensor_slices(ids).batch(size)

    return dataset.flat_map(chunks)


def split_for_mlm(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    key: str = "input_ids",
) -> tf.data.Dataset:
    """One `[CLS] piece [SEP]` example per document piece of at most L - 2 tokens (for `pack`).

    Unlike `chunk_for_mlm`, no example spans two documents: packed rows keep documents apart
    by segment ids instead of letting them share context.
    """
    length = sequence_length[key]
    if length < 3:
        raise ValueError(f"MLM rows need seq_len >= 3 ([CLS] x [SEP]), got {length}.")
    ids = _specials(output_features, key)
    cls = tf.constant([ids.cls_id], tf.int32)
    sep = tf.constant([ids.sep_id], tf.int32)
    return _document_chunks(dataset, key, length - 2, []).map(
        lambda c: {key: tf.concat([cls, c, sep], 0)}
    )


def split_for_lm(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    key: str = "input_ids",
) -> tf.data.Dataset:
    """Next-token examples of at most L tokens per document piece, [SEP] ending each document.

    Returns:
        Variable-length `input_ids` and `labels` (shifted by one) for `pack`; pieces of one
        token, which have no target, are dropped.
    """
    length = sequence_length[key]
    ids = _specials(output_features, key)
    pieces = _document_chunks(dataset, key, length + 1, [ids.sep_id])
    pieces = pieces.filter(lambda c: tf.shape(c)[0] > 1)
    return pieces.map(lambda c: {"input_ids": c[:-1], "labels": c[1:]})


def pack(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    key: str = "input_ids",
) -> tf.data.Dataset:
    """Packs variable-length examples into rows of L with `segment_ids` and `positions`.

    SeqIO's `trim_and_pack_dataset` places examples greedily; segment ids count 1, 2, ... in
    a row (0 on padding) and positions restart at 0 in each segment. Models must keep segments
    apart (attention masks, SSM state resets); see `bigs_jax.models` (`segment_ids=`).

    Returns:
        Rows with `key` (and `labels` if present, packed alongside), `segment_ids`,
        `positions`; LM rows also get `loss_weights` and `attention_mask` like `causal_lm`.
    """
    length = sequence_length[key]
    keys = [k for k in (key, "labels") if k in dataset.element_spec]
    # SeqIO's packer takes id 0 for padding: it cuts an example at its count of nonzero ids
    # and gives zeros segment 0. Id 0 is a real token in GPT-2's BPE ("!"), so ids go in
    # shifted by one and come back out.
    shifted = dataset.map(lambda ex: {k: tf.cast(ex[k], tf.int32) + 1 for k in keys})
    packed = seqio.utils.trim_and_pack_dataset(shifted, {k: length for k in keys})

    def rename(ex):
        out = {k: tf.where(ex[f"{k}_segment_ids"] > 0, ex[k] - 1, 0) for k in keys}
        out["segment_ids"] = ex[f"{key}_segment_ids"]
        out["positions"] = ex[f"{key}_positions"]
        if "labels" in keys:
            # every label of a packed example is real (split_for_lm): weight 1 inside the
            # segments, whatever the id
            out["loss_weights"] = tf.cast(out["segment_ids"] > 0, tf.float32)
            out["attention_mask"] = tf.cast(out["segment_ids"] > 0, tf.int32)
        return out

    return packed.map(rename, num_parallel_calls=tf.data.AUTOTUNE)


def bucket_by_length(
    dataset: tf.data.Dataset,
    *,
    boundaries: list[int],
    batch_size: int,
    key: str = "input_ids",
) -> tf.data.Dataset:
    """Batches variable-length examples with others of similar length (fine-tuning, eval).

    An example of length n goes to the first bucket whose bound is >= n and is padded (with 0)
    to that bound, so a batch of short sentences costs a short row instead of the longest.

    Args:
        dataset: examples whose features are all [n] of the same n (e.g. ids, token types).
        boundaries: increasing bucket bounds; the last must cover the longest example.
        batch_size: examples per batch (the last batch of a bucket may be smaller).
        key: the feature whose length picks the bucket.

    Returns:
        Batches [b, bound] of every feature.
    """
    if list(boundaries) != sorted(set(boundaries)) or not boundaries:
        raise ValueError(f"boundaries must be increasing, got {boundaries}.")
    too_long = f"an example is longer than the last bucket bound {boundaries[-1]}"

    def checked(ex):
        tf.debugging.assert_less_equal(tf.shape(ex[key])[0], boundaries[-1], message=too_long)
        return ex

    return dataset.map(checked).bucket_by_sequence_length(
        lambda ex: tf.shape(ex[key])[0],
        bucket_boundaries=[b + 1 for b in boundaries[:-1]],
        bucket_batch_sizes=[batch_size] * len(boundaries),
        padded_shapes={k: [None] for k in dataset.element_spec},
        pad_to_bucket_boundary=False,
    ).map(lambda batch: _pad_batch_to_bound(batch, key, boundaries))


def _pad_batch_to_bound(batch, key, boundaries):
    n = tf.shape(batch[key])[1]
    bounds = tf.constant(boundaries, tf.int32)
    bound = tf.gather(bounds, tf.argmax(tf.cast(bounds >= n, tf.int32)))
    return {k: tf.pad(v, [[0, 0], [0, bound - n]]) for k, v in batch.items()}
