"""Streaming input path: batches from a SeqIO task or mixture that never hold a split in memory.

`pipeline.make_iterator` keeps a split in host memory and draws rows by position; that caps a
split at `pipeline._MAX_TOKENS_IN_MEMORY` tokens. `make_stream_iterator` reads the split as a
stream instead (`config.data.streaming=True`), with the same batches' keys, dtypes and shapes.

What each host reads. SeqIO gets `seqio.ShardInfo(shard_index, num_shards)`. A file task with
at least `num_shards` files reads only files shard_index, shard_index + num_shards, ... of its
sorted list; a tfds task reads only the shard_index-th of `num_shards` equal ranges of the
split's examples (`tfds.even_splits`); a task with fewer files than hosts (or the embedded
corpus) reads every document and keeps every num_shards-th one. Hosts thus see disjoint
documents that together make up the split, every epoch (see `sources`).

Order. With `shuffle` (the default for an infinite stream), epoch e of a task reads its files
in an order drawn from (seed, e) (`sources.ShardedSource`; tfds: its file instructions), cuts
rows as SeqIO's preprocessors do, and shuffles them in a buffer of `shuffle_buffer` rows seeded
by (seed, e): every epoch is ordered differently, the same way on every run. Without
`shuffle`, every epoch reads the host's documents in their fixed order. A mixture samples its
tasks' streams with `tf.data.Dataset.sample_from_datasets` at their normalized rates, seeded by
`seed` (a finite mixture ends when every task has run out); mixing packed and unpacked tasks
gives unpacked rows one segment each, as in `pipeline`.

Masks. Row p of this host's stream (counted from 0 over all epochs) is masked, for an MLM
task, with key (seed, g), g = p * num_shards + shard_index: unique over hosts and epochs (a row
that comes back in a later epoch is masked anew) and a function of (seed, host layout, p) only.

Resume. Batch s of a host is its rows [s * b, (s + 1) * b), b = batch_size // num_shards.
The iterator's `state()` is its position after the batches it has yielded: tf.data's own
iterator state (the epoch and file being read and the offset in it, the shuffle buffer, the
mixture sampler, the batches prefetched) after a JSON line naming the stream (task, seed,
sizes, host layout) and the step. The train loop saves it with every checkpoint, one file per
host (`train.checkpointing.DATA`), taken when the loop has consumed exactly that step's
batches; a resumed run's `restore(state)` continues from there before reading anything, in
time independent of the step (about a shuffle buffer and the prefetched batches are read;
`bench/stream_resume.py`: 1-2 s at steps 20, 200 and 2,000 where replaying took 3, 7 and 51 s).
Without a state it can restore (a checkpoint of an older bigs_jax, another number of hosts,
another stream), `start_step=k` replays the stream and skips its first k * b rows before
masking: O(rows consumed), at the host's input-pipeline speed (measured: ~3,500 rows/s of 128
tokens, ~0.45M tokens/s, for the wikitext-2 test split in 8 files on 2 busy CPU cores;
tests/data/test_streaming.py prints the rate on its corpus). Either way the iterator yields
exactly the batches of an uninterrupted stream from step k on.

A finite stream (`num_epochs=k`; evaluation: 1, unshuffled by default) ends after k epochs
with its last batch completed by all-zero rows (loss_weights 0, attention_mask 0). Its length
is unknown in advance (`num_steps` is None) and may differ between hosts; every host's stream
ends. Unlike `make_iterator`, a host's batches are not a slice of a single-host batch: the
stream of each host depends on the number of hosts.
"""

from __future__ import annotations

import functools
import json
from typing import Callable, Iterator

import numpy as np
import seqio
import tensorflow as tf
from tensorflow.python.autograph.core import ag_ctx  # pylint: disable=no-name-in-module

from bigs_jax.data import hide_accelerators_from_tensorflow, pipeline, tasks

hide_accelerators_from_tensorflow()

STATE_FORMAT = 1  # of `StreamIterator.state()`; a state of another format is not restored
# The only state tf.data calls external here is the seed generator a seeded shuffle inside
# `flat_map` is handed (a dummy: the op seeds itself from the fixed seed); its position is part
# of the shuffle's own saved state, so the iterator state is complete without it.
_CHECKPOINTABLE = tf.data.Options()
_CHECKPOINTABLE.experimental_external_state_policy = (
    tf.data.experimental.ExternalStatePolicy.IGNORE)


def _epoch_seed(seed: int, epoch: tf.Tensor, member: int) -> tf.Tensor:
    """A scalar int64 seed for one epoch of one mixture member, drawn from (seed, epoch)."""
    key = tf.stack([tf.constant(seed, tf.int64),
                    tf.cast(epoch, tf.int64) * pipeline.MAX_MIXTURE_TASKS + member])
    return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def _numeric(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Int features as int32 and float ones as float32; strings (pretokenized text) dropped."""
    out = {}
    for k, v in ex.items():
        if v.dtype.is_integer:
            out[k] = tf.cast(v, tf.int32)
        elif v.dtype.is_floating:
            out[k] = tf.cast(v, tf.float32)
    return out


def _with_packing_features(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """An unpacked row as a packed one of one segment (`pipeline._with_packing_features`)."""
    if "segment_ids" in ex:
        return ex
    # LM rows say where their pads are (id 0 can be a real token); MLM rows pad with id 0
    real = tf.cast(ex["attention_mask"] if "attention_mask" in ex else ex["input_ids"] != 0,
                   tf.int32)
    return {**ex, "segment_ids": real, "positions": tf.range(tf.size(real)) * real}


def _task_rows(
    task: seqio.Task,
    member: int,
    *,
    split: str,
    seq_len: int,
    seed: int,
    shard_info: seqio.ShardInfo,
    num_epochs: int | None,
    shuffle: bool,
    shuffle_buffer: int,
) -> tf.data.Dataset:
    """This host's rows of one task, epoch after epoch."""
    sequence_length = {k: seq_len for k in task.output_features}

    # SeqIO builds each epoch's pipeline in plain Python, as it does eagerly: AutoGraph would
    # otherwise rewrite all of SeqIO's code while tracing this function (seconds per
    # pipeline), while the maps SeqIO creates must still be converted as usual (its packing
    # relies on it); no public API but this context gives both.
    @tf.autograph.experimental.do_not_convert
    def epoch(e):
        with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.UNSPECIFIED):
            ds = task.get_dataset(
                sequence_length, split=split, shuffle=shuffle,
                seed=_epoch_seed(seed, e, member) if shuffle else None,
                shuffle_buffer_size=shuffle_buffer, shard_info=shard_info, num_epochs=1,
                use_cached=False, try_in_mem_cache=False)
            return ds.map(_numeric)

    if num_epochs is None:
        # An infinite repeat of nothing would spin forever: check that this host has a row.
        first = task.get_dataset(sequence_length, split=split, shuffle=False,
                                 shard_info=shard_info, num_epochs=1, use_cached=False,
                                 try_in_mem_cache=False)
        if not any(True for _ in first.take(1)):
            raise ValueError(
                f"Task {task.name!r} split {split!r} has no row for host {shard_info.index} "
                f"of {shard_info.num_shards}; use a larger split or fewer hosts.")
    epochs = tf.data.Dataset.counter() if num_epochs is None else tf.data.Dataset.range(
        num_epochs)
    return epochs.flat_map(epoch)


class StreamIterator(Iterator[dict[str, np.ndarray]]):
    """A host's streamed batches (`make_stream_iterator`), resumable from a saved position.

    `state()` is the position after the batches yielded so far, as bytes to keep with a
    checkpoint; `restore(state)`, called before the first batch, continues from there in time
    independent of the position (see the module docstring). Like `pipeline.BatchIterator`,
    `step` is the global step of the next batch; `num_steps` and `examples_per_epoch` are
    None.
    """

    def __init__(self, build: Callable[[int], tf.data.Dataset], stream: dict, *,
                 start_step: int, skip_rows: int):
        self._build = build  # rows to skip -> the batches' dataset
        self._stream = stream  # what the batches depend on: a state restores only onto these
        self._skip_rows = skip_rows
        self._iterator = None
        self.step = start_step
        self.num_steps = None
        self.examples_per_epoch = None

    def _batches(self):
        # Built on first use, so that a restore replaces it before anything was read.
        if self._iterator is None:
            self._iterator = iter(self._build(self._skip_rows))
        return self._iterator

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches())
        self.step += 1
        return {k: v.numpy() for k, v in batch.items()}

    def state(self) -> bytes:
        """The position after the batches yielded so far: tf.data's iterator state (shuffle
        buffers, file offsets, mixture sampler, prefetched batches) after a JSON line saying
        which stream and step it belongs to."""
        header = {**self._stream, "step": self.step, "skip_rows": self._skip_rows}
        # `_serialize_to_tensors` is what tf.train.Checkpoint saves of an iterator (the
        # Trackable protocol); serialize_tensor turns its variant into bytes without a file.
        variant = self._batches()._serialize_to_tensors()["_STATE"]
        return (json.dumps(header, sort_keys=True).encode() + b"\n"
                + tf.io.serialize_tensor(variant).numpy())

    def restore(self, state: bytes) -> None:
        """Continue from `state` (a `state()` of this stream at this iterator's `step`), before
        the first batch; ValueError saying why if `state` is not one."""
        if self._iterator is not None:
            raise ValueError("restore() must come before the first batch")
        header, _, blob = state.partition(b"\n")
        try:
            header = json.loads(header)
        except ValueError:
            raise ValueError("its header is not JSON") from None
        saved = {k: header.get(k) for k in self._stream}
        if saved != self._stream:
            differ = sorted(k for k in self._stream if saved[k] != self._stream[k])
            raise ValueError(f"it was saved for another stream ({', '.join(differ)} differ)")
        if header.get("step") != self.step:
            raise ValueError(f"it was saved at step {header.get('step')}, not {self.step}")
        # The dataset is rebuilt as the saving run built it (the rows it skipped, if it was
        # itself resumed by replay): the state restores only onto the same graph.
        iterator = iter(self._build(int(header["skip_rows"])))
        try:
            iterator._restore_from_tensors(  # pylint: disable=protected-access
                {"_STATE": tf.io.parse_tensor(blob, tf.variant)})
        except (tf.errors.OpError, ValueError) as e:
            raise ValueError(f"tf.data cannot restore it ({str(e).splitlines()[0]})") from None
        self._iterator, self._skip_rows = iterator, int(header["skip_rows"])


def make_stream_iterator(
    task_name: str,
    *,
    split: str,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    start_step: int = 0,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 10_000,
    mask_rate: float = 0.15,
    whole_word: bool = False,
) -> StreamIterator:
    """Numpy batches of a SeqIO task or mixture, streamed (see the module docstring).

    Args:
        task_name: a registered task or mixture, or a task spec (`mixtures.get_task`). A task
            without `labels` is masked here (BERT, `preprocessors.mask_tokens`).
        split: e.g. "train" or "validation".
        batch_size: global batch size over all shards; each host gets
            `batch_size // num_shards` rows.
        seq_len: row length L.
        seed: seeds the file orders, the row shuffles, the mixture sampling and the masks.
        shard_index: this host's shard (usually `jax.process_index()`).
        num_shards: number of shards (usually `jax.process_count()`).
        start_step: first step to produce. The iterator replays and skips the rows before
            it (O(rows consumed)) unless `restore()` gives it a position saved at that step
            (O(1)); either way it yields exactly what an uninterrupted stream yields from
            there.
        num_epochs: None for an infinite stream (training); k for k passes over the split,
            the last batch completed by all-zero rows (evaluation: 1).
        shuffle: shuffle files and rows anew each epoch; defaults to True for an infinite
            stream and False for a finite one.
        shuffle_buffer: rows in the shuffle buffer (more: better mixed, more host memory).
        mask_rate: MLM selection probability (0.15 for BERT, 0.30 for M2).
        whole_word: whole-word masking (all pieces of a selected word).

    Returns:
        A `StreamIterator` of dicts of [batch_size // num_shards, L] arrays, with the keys
        and dtypes of `pipeline.make_iterator`'s. Its `num_steps` and `examples_per_epoch`
        are None: a stream's length is unknown until it ends.

    Raises:
        ValueError: on an unknown task or split, inconsistent sizes or shard arguments, or an
            infinite stream with no row for this host.
    """
    pipeline.check_arguments(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                             num_shards=num_shards, start_step=start_step,
                             num_epochs=num_epochs, seed=seed)
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}.")
    members, is_mlm = pipeline.task_members(task_name, mask_rate)
    for t, _ in members:
        if split not in t.splits:
            raise ValueError(f"Task {t.name!r} has no split {split!r}; use one of {t.splits}.")
    mask = pipeline.mlm_masker(members, seed, mask_rate, whole_word) if is_mlm else None
    shuffle = num_epochs is None if shuffle is None else shuffle
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
    rows = _mixed_rows(members, split=split, seq_len=seq_len, seed=seed, shard_info=shard_info,
                       num_epochs=num_epochs, shuffle=shuffle, shuffle_buffer=shuffle_buffer)

    per_host = batch_size // num_shards
    build = functools.partial(_batches_from, rows, mask, per_host, seq_len, shard_index,
                              num_shards, num_epochs is not None)
    stream = dict(task=task_name, split=split, seed=seed, batch_size=per_host, seq_len=seq_len,
                  shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs,
                  shuffle=shuffle, shuffle_buffer=shuffle_buffer, mask_rate=mask_rate,
                  whole_word=whole_word, format=STATE_FORMAT)
    return StreamIterator(build, stream, start_step=start_step,
                          skip_rows=start_step * per_host)


def _batches_from(rows: tf.data.Dataset, mask, per_host: int, seq_len: int, shard_index: int,
                  num_shards: int, finite: bool, skip_rows: int) -> tf.data.Dataset:
    """The host batches of `rows` after the first `skip_rows`, masked by their positions."""

    def finish(position, ex):
        # Row `position` of this host is global row position * num_shards + shard_index.
        return ex if mask is None else mask(ex, position * num_shards + shard_index)

    finished = rows.enumerate().skip(skip_rows).map(finish, num_parallel_calls=tf.data.AUTOTUNE,
                                                    deterministic=True)
    batches = _batches(finished, per_host, seq_len, complete_last=finite)
    return batches.prefetch(tf.data.AUTOTUNE).with_options(_CHECKPOINTABLE)


def _mixed_rows(members, *, seed: int, **kw) -> tf.data.Dataset:
    """The rows of a task, or of a mixture's tasks sampled by their rates."""
    streams = [_task_rows(t, i, seed=seed, **kw) for i, (t, _) in enumerate(members)]
    if len(members) == 1:
        return streams[0]
    if any(tasks.is_packed(t) for t, _ in members):
        streams = [s.map(_with_packing_features) for s in streams]
    return tf.data.Dataset.sample_from_datasets(
        streams, weights=[r for _, r in members], seed=seed, stop_on_empty_dataset=False)


def _batches(rows: tf.data.Dataset, per_host: int, seq_len: int,
             complete_last: bool) -> tf.data.Dataset:
    """Host batches of `per_host` rows; a finite stream's last batch completed by zero rows."""
    if not complete_last:
        return rows.batch(per_host, drop_remainder=True)

    def complete(batch):
        pad = per_host - tf.shape(batch["input_ids"])[0]
        return {k: tf.ensure_shape(tf.pad(v, [[0, pad], [0, 0]]), [per_host, seq_len])
                for k, v in batch.items()}

    return rows.batch(per_host).map(complete)
