"""Host-side input pipeline: deterministic, resumable, sharded numpy batches from a SeqIO task.

How a batch is made. The task's split is run once through SeqIO (tokenize, chunk; no shuffle,
one epoch) and kept in host memory as an array of N rows. The training stream is the infinite
sequence of *global example positions* g = 0, 1, 2, ...; position g is row
`index_shuffle(g mod N, seed=(seed, epoch))` of epoch `g // N` (a fresh permutation per
epoch), and for an MLM task it is masked with RNG key (seed, g). Global batch `s` is positions
[s * batch_size, (s + 1) * batch_size); with b = batch_size // num_shards, host `shard_index`
takes positions [s * batch_size + shard_index * b, s * batch_size + (shard_index + 1) * b).
Consequences:

- Each batch is a pure function of (task, split, seq_len, seed, step): resuming at
  `start_step=k` is O(1) and yields exactly the batches an uninterrupted run yields from k on.
- Shards are disjoint, and concatenating the hosts' batches of a step in shard order gives the
  single-host batch of that step (masks included, since they depend on g, not on the host).
- Masks differ between epochs (the same row has a new g), as BERT's dynamic masking wants.
- With `num_epochs` set, the stream stops after `ceil(num_epochs * N / batch_size)` batches;
  positions past the end are all-zero rows (loss_weights 0, attention_mask 0).

A mixture (`mixtures`) keeps every task's rows and draws position g as follows: each block
of `MIXTURE_BLOCK` positions holds exactly its rates' share of each task (largest remainders),
at places permuted per block by (seed, block); the k-th draw of task t is row k mod N_t of that
task's permutation for its epoch k // N_t. Rates are thus exact per block, and every property
above (O(1) resume, disjoint host shards that concatenate to the single-host stream) holds for
mixtures too. Mixing packed and unpacked tasks gives unpacked rows one segment each.

The split must fit in host memory (the embedded corpus is ~0.3 MB of ids at any length); a
larger one fails here with a clear error. Web-scale corpora take the streaming path,
`streaming.make_stream_iterator` (`config.data.streaming=True`): the same batches' layout,
read as a stream, resumed by replaying it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import seqio
import tensorflow as tf

from bigs_jax.data import (
    hide_accelerators_from_tensorflow,
    mixtures,
    preprocessors,
    tasks,
    vocab,
)

hide_accelerators_from_tensorflow()

_MAX_TOKENS_IN_MEMORY = 1 << 28  # 1 GiB of int32 ids per host
# A mixture assigns each block of this many consecutive positions exactly its rates' share.
MIXTURE_BLOCK = 1000
MAX_MIXTURE_TASKS = 256


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator of numpy batch dicts; `step` is the global step of the next batch.

    Attributes:
        step: index of the batch the next `next()` returns (save it to resume).
        num_steps: total number of batches of a finite stream, None if infinite (or, for a
            `streaming` iterator, unknown).
        examples_per_epoch: rows in one epoch of the split (None for a `streaming` iterator).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        start_step: int,
        num_steps: int | None,
        examples_per_epoch: int | None,
    ):
        self._batches = dataset.as_numpy_iterator()
        self.step = start_step
        self.num_steps = num_steps
        self.examples_per_epoch = examples_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        self.step += 1
        return batch


def _get_task(task_name: str) -> seqio.Task | seqio.Mixture:
    return mixtures.get_task(task_name)


def _members(task: seqio.Task | seqio.Mixture) -> list[tuple[seqio.Task, float]]:
    """(task, normalized rate) of a mixture, or [(task, 1.0)]."""
    if isinstance(task, seqio.Task):
        return [(task, 1.0)]
    rates = [(t, task.get_rate(t)) for t in task.tasks]
    total = sum(r for _, r in rates)
    return [(t, r / total) for t, r in rates if r > 0]


def _block_counts(rates: list[float]) -> np.ndarray:
    """Examples per task in each block of `MIXTURE_BLOCK` positions (largest remainders)."""
    exact = np.asarray(rates) * MIXTURE_BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: MIXTURE_BLOCK - counts.sum()]] += 1
    return counts


def _with_packing_features(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unpacked rows as packed ones of one segment each, so mixtures can mix both kinds."""
    if "segment_ids" in rows:
        return rows
    # LM rows say where their pads are (id 0 can be a real token); MLM rows pad with id 0
    real = (rows["attention_mask"] if "attention_mask" in rows
            else (rows["input_ids"] != 0)).astype(np.int32)
    positions = np.broadcast_to(np.arange(real.shape[1], dtype=np.int32), real.shape) * real
    return {**rows, "segment_ids": real, "positions": positions}


@functools.lru_cache(maxsize=16)
def _rows(task: seqio.Task, split: str, seq_len: int) -> dict[str, np.ndarray]:
    """All rows of one epoch of a task split, as numpy arrays (read-only, cached)."""
    if split not in task.splits:
        raise ValueError(f"Task {task.name!r} has no split {split!r}; use one of {task.splits}.")
    ds = task.get_dataset(
        sequence_length={k: seq_len for k in task.output_features},
        split=split,
        shuffle=False,
        num_epochs=1,
        use_cached=False,
    )
    parts: dict[str, list[np.ndarray]] = {}
    num_tokens = 0
    for batch in ds.batch(1024).as_numpy_iterator():
        for k, v in batch.items():
            if v.dtype.kind in "iuf":  # drop strings such as pretokenized text
                parts.setdefault(k, []).append(v)
        num_tokens += batch["input_ids"].size
        if num_tokens > _MAX_TOKENS_IN_MEMORY:
            raise ValueError(
                f"Task {task.name!r} split {split!r} exceeds {_MAX_TOKENS_IN_MEMORY} tokens, "
                "too many to keep in host memory; set config.data.streaming=True (or call "
                "streaming.make_stream_iterator) to stream it instead."
            )
    if not parts:
        raise ValueError(f"Task {task.name!r} split {split!r} is empty.")
    rows = {}
    for k, v in parts.items():
        arr = np.concatenate(v)
        arr = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int32)
        arr.flags.writeable = False
        rows[k] = arr
    return rows


def examples_per_epoch(task_name: str, *, split: str, seq_len: int) -> int:
    """Rows (examples) in one epoch of a task's split at a given length (a mixture: of all
    its tasks)."""
    return sum(len(_rows(t, split, seq_len)["input_ids"])
               for t, _ in _members(_get_task(task_name)))


def check_arguments(*, batch_size: int, seq_len: int, shard_index: int, num_shards: int,
                    start_step: int, num_epochs: int | None, seed: int) -> None:
    """Raises ValueError on sizes or shard arguments no iterator can serve."""
    checks = {
        "batch_size": (batch_size, 1),
        "seq_len": (seq_len, 1),
        "num_shards": (num_shards, 1),
        "start_step": (start_step, 0),
    }
    for name, (value, low) in checks.items():
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}.")
    if batch_size % num_shards:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by num_shards {num_shards}; "
            "use a global batch size that is a multiple of the number of hosts."
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}.")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer, got {seed}.")


def make_iterator(
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
    mask_rate: float = 0.15,
    whole_word: bool = False,
) -> BatchIterator:
    """Numpy batches of a SeqIO task for this host (see the module docstring for the scheme).

    Args:
        task_name: a registered task, e.g. "embedded_mlm" or "embedded_lm". A task without
            `labels` is masked here (BERT, `preprocessors.mask_tokens`); others are used as is.
        split: e.g. "train" or "validation".
        batch_size: global batch size over all shards; each host gets
            `batch_size // num_shards` rows.
        seq_len: row length L.
        seed: seeds the per-epoch shuffle and the masks.
        shard_index: this host's shard (usually `jax.process_index()`).
        num_shards: number of shards (usually `jax.process_count()`).
        start_step: first global step to produce; resumes a run exactly.
        num_epochs: None for an infinite stream (training); k for k epochs, with the last
            batch completed by all-zero rows (evaluation: 1).
        shuffle: permute rows anew each epoch; defaults to True for an infinite stream and
            False for a finite one.
        mask_rate: MLM selection probability (0.15 for BERT, 0.30 for M2).
        whole_word: whole-word masking (all pieces of a selected word).

    Returns:
        A `BatchIterator` of dicts of [batch_size // num_shards, L] arrays: int32 `input_ids`,
        `labels`, `attention_mask` (and `token_type_ids` for MLM), float32 `loss_weights`;
        packed tasks and mixtures with a packed task add int32 `segment_ids` and `positions`.

    Raises:
        ValueError: on an unknown task or split, or inconsistent sizes or shard arguments.
    """
    check_arguments(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                    num_shards=num_shards, start_step=start_step, num_epochs=num_epochs,
                    seed=seed)
    members, is_mlm = task_members(task_name, mask_rate)
    parts = [_rows(t, split, seq_len) for t, _ in members]
    if len(members) > 1 and any(tasks.is_packed(t) for t, _ in members):
        parts = [_with_packing_features(p) for p in parts]
    sizes = np.array([len(p["input_ids"]) for p in parts])
    num_rows = int(sizes.sum())
    shuffle = num_epochs is None if shuffle is None else shuffle

    per_host = batch_size // num_shards
    num_steps = None
    if num_epochs is not None:
        num_steps = math.ceil(num_epochs * num_rows / batch_size)
        start_step = min(start_step, num_steps)
    table = {k: tf.constant(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    if len(members) > 1:
        row_of = _mixture_row_fn([r for _, r in members], sizes, seed)
    else:
        row_of = _single_row_fn(num_rows, seed, shuffle)
    mask = mlm_masker(members, seed, mask_rate, whole_word) if is_mlm else None

    def example(local_index):
        step, offset = local_index // per_host, local_index % per_host
        g = step * batch_size + shard_index * per_host + offset
        ex = {k: tf.gather(v, row_of(g, num_rows)) for k, v in table.items()}
        if mask is not None:
            ex = mask(ex, g)
        if num_epochs is not None:
            valid = g < num_epochs * num_rows
            ex = {k: tf.where(valid, v, tf.zeros_like(v)) for k, v in ex.items()}
        return ex

    return BatchIterator(_host_batches(example, per_host, start_step, num_steps),
                         start_step=start_step, num_steps=num_steps, examples_per_epoch=num_rows)


def _host_batches(example, per_host: int, start_step: int,
                  num_steps: int | None) -> tf.data.Dataset:
    """Batches of `example(i)` over this host's indices i from step `start_step` on."""
    start = start_step * per_host
    if num_steps is None:
        indices = tf.data.Dataset.counter(start)
    else:
        indices = tf.data.Dataset.range(start, num_steps * per_host)
    ds = indices.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _single_row_fn(num_rows: int, seed: int, shuffle: bool):
    """(global position g, rows) -> row of a single task: a fresh permutation per epoch."""

    def row_of(g, num_rows=num_rows):
        epoch, position = g // num_rows, g % num_rows
        if not shuffle:
            return position
        return tf.random.experimental.index_shuffle(
            position, seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
            max_index=num_rows - 1)

    return row_of


def _mixture_row_fn(rates, sizes: np.ndarray, seed: int):
    """(global position g, rows) -> row of a mixture's concatenated task tables."""
    counts = _block_counts(rates)
    mix = {
        "count": tf.constant(counts), "start": tf.constant(np.cumsum(counts) - counts),
        "ends": tf.constant(np.cumsum(counts)), "size": tf.constant(sizes, tf.int64),
        "offset": tf.constant(np.cumsum(sizes) - sizes, tf.int64),
    }

    def row_of(g, num_rows=None):
        # Block b of positions holds exactly count[t] examples of task t, at places drawn by
        # a permutation of the block; the k-th example of task t is row k mod N_t of the
        # task's permutation for epoch k // N_t. All of it is O(1) in g.
        del num_rows
        block, place = g // MIXTURE_BLOCK, g % MIXTURE_BLOCK
        slot = tf.random.experimental.index_shuffle(
            place, seed=tf.stack([tf.constant(seed, tf.int64), -1 - block]),
            max_index=MIXTURE_BLOCK - 1)
        t = tf.searchsorted(mix["ends"], tf.reshape(slot, [1]), side="right")[0]
        k = block * mix["count"][t] + slot - mix["start"][t]
        n = mix["size"][t]
        row = tf.random.experimental.index_shuffle(
            k % n, seed=tf.stack([tf.constant(seed, tf.int64),
                                  k // n * MAX_MIXTURE_TASKS + tf.cast(t, tf.int64)]),
            max_index=n - 1)
        return mix["offset"][t] + row

    return row_of


def task_members(task_name: str, mask_rate: float) -> tuple[list, bool]:
    """([(task, rate)] of a task or mixture, whether it is MLM), checked for both iterators."""
    members = _members(_get_task(task_name))
    is_mlm = "labels" not in members[0][0].output_features
    if is_mlm and not 0.0 < mask_rate < 1.0:
        raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}.")
    if len(members) > MAX_MIXTURE_TASKS:
        raise ValueError(f"Mixture {task_name!r} has {len(members)} tasks; at most "
                         f"{MAX_MIXTURE_TASKS} are supported.")
    return members, is_mlm


def mlm_masker(members, seed: int, mask_rate: float, whole_word: bool):
    """(example, global position g) -> the example BERT-masked by a key of (seed, g), its
    packing features kept."""
    vocabulary = members[0][0].output_features["input_ids"].vocabulary
    specials = vocab.special_ids(vocabulary)
    word_starts = preprocessors.word_start_table(vocabulary) if whole_word else None

    def mask(ex, g):
        packing = {k: ex[k] for k in preprocessors.PACKING_FEATURES if k in ex}
        ex = preprocessors.mask_tokens(
            ex["input_ids"],
            preprocessors.example_key(seed, g),
            specials=specials,
            mask_rate=mask_rate,
            word_starts=word_starts,
        )
        ex.update(packing)
        return ex

    return mask
