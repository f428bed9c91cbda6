"""`config.data.source = "seqio"`: a registered SeqIO task or mixture, as the train loop reads it.

Batches come from `pipeline.make_iterator` (the split in host memory) or, with
`config.data.streaming`, from `streaming.make_stream_iterator` (corpora larger than host memory).
Both are deterministic and resumable at any step, and every host reads its own part.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from bigs_jax.data import mixtures, pipeline, registry, streaming
from bigs_jax.errors import ConfigError


def task_vocabulary(task_name: str):
    """The vocabulary of a SeqIO task's or mixture's `input_ids` feature.

    `task_name` is a registered name, a task spec or a mixture spec (`mixtures.get_task`).
    """
    try:
        task = mixtures.get_task(task_name)
    except ValueError as e:
        raise ConfigError(f"config.data.task: {e}") from None
    features = task.tasks[0].output_features if hasattr(task, "tasks") else task.output_features
    return features["input_ids"].vocabulary


def task_vocab_size(task_name: str) -> int:
    """Vocabulary size of a SeqIO task's or mixture's `input_ids` feature."""
    return task_vocabulary(task_name).vocab_size


def _batch_options(d: ConfigDict) -> dict:
    """The arguments `make_iterator` and `make_stream_iterator` share, for this host."""
    return dict(batch_size=d.batch_size, seq_len=d.seq_len, seed=d.seed,
                shard_index=jax.process_index(), num_shards=jax.process_count(),
                mask_rate=d.mask_rate, whole_word=d.whole_word)


def _equalize_eval_batches(evals: list[dict], d: ConfigDict) -> list[dict]:
    """Pad this host's streamed eval batches with all-zero ones to the most any host has, so
    every host runs as many eval steps; a host with none fails on every host at once."""
    counts = np.array([len(evals)])
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(np.int32(len(evals))))
    if counts.min() == 0:  # raised on every host, so none waits for the others
        raise ConfigError(
            f"config.data.eval_split {d.eval_split!r} of {d.task!r} has no rows for host "
            f"{int(counts.argmin())} of {jax.process_count()}; use a larger split")
    return evals + [{k: np.zeros_like(v) for k, v in evals[0].items()}] * (
        int(counts.max()) - len(evals))


def _streamed(d: ConfigDict, start_step: int) -> tuple[Iterator[dict], list[dict]]:
    kw = _batch_options(d)
    train = streaming.make_stream_iterator(d.task, split="train", start_step=start_step,
                                           shuffle_buffer=d.shuffle_buffer, **kw)
    stream = streaming.make_stream_iterator(d.task, split=d.eval_split, num_epochs=1,
                                            **{**kw, "batch_size": d.eval_batch_size})
    # Only the first `eval_batches` batches of the eval split are read (all of it when 0).
    evals = list(itertools.islice(stream, d.eval_batches or None))
    return train, _equalize_eval_batches(evals, d)


def _in_memory(d: ConfigDict, start_step: int) -> tuple[Iterator[dict], list[dict]]:
    kw = _batch_options(d)
    train = pipeline.make_iterator(d.task, split="train", start_step=start_step, **kw)
    evals = list(pipeline.make_iterator(d.task, split=d.eval_split, num_epochs=1,
                                        **{**kw, "batch_size": d.eval_batch_size}))
    if d.eval_batches:
        evals = evals[: d.eval_batches]
    return train, evals


def make_data(config: ConfigDict, *, start_step: int) -> tuple[Iterator[dict], list[dict]]:
    """(train iterator from `start_step`, list of eval batches) of `config.data.task`."""
    d = config.data
    return (_streamed if d.streaming else _in_memory)(d, start_step)


@dataclasses.dataclass
class SeqioSource:
    """A registered SeqIO task or mixture (`config.data.task`)."""

    config: ConfigDict

    def model_overrides(self) -> dict:
        return {"vocab_size": task_vocab_size(self.config.data.task)}

    def iterators(self, start_step: int) -> tuple[Iterator[dict], list[dict]]:
        return make_data(self.config, start_step=start_step)

    def vocabulary(self):
        return task_vocabulary(self.config.data.task)


registry.register("seqio", SeqioSource)
