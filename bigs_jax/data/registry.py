"""The data-source protocol the train loop reads, and the registry of sources by name.

`config.data.source` names a registered source. Each package that owns a kind of data
registers its own when imported: `data.seqio_source` ("seqio", SeqIO tasks and mixtures),
`data.images` ("images"), `evals.glue` and `evals.scrolls` (fine-tuning). The loop imports
only this module and the sources of `data/`; entry points (train.py, eval.py) import the
others, so `train/` never names `evals/`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from ml_collections import ConfigDict

from bigs_jax.errors import ConfigError


class DataSource(Protocol):
    """What the loop needs from a dataset.

    A source may also define `score(step, predict) -> dict`: the loop then calls it at every
    evaluation with `predict`, a function from a host batch to the model's logits, and logs
    what it returns (GLUE/SCROLLS metrics).
    """

    def model_overrides(self) -> dict:
        """Model options the data fixes, e.g. {"vocab_size": 8192} or {"num_labels": 3}."""

    def iterators(self, start_step: int) -> tuple[Iterator[dict], list[dict]]:
        """(host-local train batches from batch `start_step` on, held-out eval batches)."""


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
