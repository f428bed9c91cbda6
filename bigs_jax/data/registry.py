"""The data-source protocol the train loop reads, and the registry of sources by name.

`config.data.source` names a registered source. Each package that owns a kind of data
registers its own when imported: `data.seqio_source` ("seqio", SeqIO tasks and mixtures),
`data.images` ("images"), `evals.glue` and `evals.scrolls` (fine-tuning). The loop imports
only this module and the sources of `data/`; entry points (train.py, eval.py) import the
others, so `train/` never names `evals/`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
from ml_collections import ConfigDict

from bigs_jax.errors import ConfigError


class DataSource(Protocol):
    """What the loop needs from a dataset.

    A source may also define `score(step, predict) -> dict`: the loop then calls it at every
    evaluation with `predict`, a function from a host batch to the model's logits, and logs
    what it returns (GLUE/SCROLLS metrics); and `vocabulary()`, the SeqIO vocabulary of its
    token ids, which the loop records in the workdir (`tokenizer/`) for eval.py and
    `data.tasks.load_vocabulary`; and `device_batch(batch) -> batch`, a jax function the
    jitted steps apply to every global batch before the model (the image source normalises
    its uint8 pixels there, so hosts send a quarter of the bytes).
    """

    def model_overrides(self) -> dict:
        """Model options the data fixes, e.g. {"vocab_size": 8192} or {"num_labels": 3}."""

    def iterators(self, start_step: int) -> tuple[Iterator[dict], Iterable[dict]]:
        """(host-local train batches from batch `start_step` on, held-out eval batches: a
        list, or a finite stream the loop iterates afresh at every evaluation)."""


SourceFactory = Callable[[ConfigDict], DataSource]
_SOURCES: dict[str, SourceFactory] = {}


def register(name: str, factory: SourceFactory) -> None:
    """Make `config.data.source = name` build its source with `factory(config)`."""
    if name in _SOURCES and _SOURCES[name] is not factory:
        raise ValueError(f"data source {name!r} registered twice")
    _SOURCES[name] = factory


def names() -> list[str]:
    return sorted(_SOURCES)


def make_data_source(config: ConfigDict) -> DataSource:
    """The registered source `config.data.source` over `config`."""
    name = config.data.source
    if name not in _SOURCES:
        raise ConfigError(f"unknown config.data.source {name!r}; registered: {names()} (a "
                          "source registers when the module that defines it is imported)")
    return _SOURCES[name](config)


def check_token_ids(batch: dict, vocab_size: Optional[int], where: str,
                    type_vocab_size: Optional[int] = None) -> dict:
    """`batch` after checking its token ids (a host min/max per array, once per batch): ids
    from another tokenizer would give NaN or garbage, not an error. `input_ids` and the LM
    `labels` beside them lie in [0, vocab_size), `token_type_ids` in [0, type_vocab_size).
    Labels of another shape or dtype (a class per row, a regression score) are no token
    ids and are left alone."""
    if batch.get("input_ids") is None:
        return batch
    vocabulary = "vocabulary", vocab_size, "tokenize config.data with the model's vocabulary"
    for key, (table, size, fix) in (("input_ids", vocabulary), ("labels", vocabulary), (
            "token_type_ids", ("token types", type_vocab_size, "give segment ids "
                               "0..type_vocab_size-1, or no token_type_ids"))):
        ids = batch.get(key)
        if not size or ids is None or ids.size == 0:  # size 0: the model has no such table
            continue
        if key == "labels" and (ids.shape != batch["input_ids"].shape
                                or not np.issubdtype(ids.dtype, np.integer)):
            continue
        if int(np.min(ids)) < 0 or int(np.max(ids)) >= size:
            bad = ids[(ids < 0) | (ids >= size)]
            what = "vocab_size" if table == "vocabulary" else "type_vocab_size"
            raise ConfigError(
                f"{where} has {key} outside the model's {table}: {bad.size} ids in "
                f"[{bad.min()}, {bad.max()}], but {what} is {size} (ids 0..{size - 1}); {fix}")
    return batch


def checked_batches(batches: Iterator[dict], vocab_size: Optional[int], start_step: int,
                    type_vocab_size: Optional[int] = None) -> Iterator[dict]:
    """`batches` (the train batches from step `start_step` on), each checked by
    `check_token_ids`."""
    for step, batch in enumerate(batches, start_step + 1):
        yield check_token_ids(batch, vocab_size, f"config.data's train batch of step {step}",
                              type_vocab_size)


@dataclasses.dataclass
class CheckedEvalBatches:
    """A stream of eval batches, each checked by `check_token_ids` as it is read."""

    batches: Iterable[dict]
    vocab_size: Optional[int]
    type_vocab_size: Optional[int] = None

    def __iter__(self) -> Iterator[dict]:
        for i, batch in enumerate(self.batches):
            yield check_token_ids(batch, self.vocab_size, f"config.data's eval batch {i}",
                                  self.type_vocab_size)
