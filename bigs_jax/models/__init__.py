"""The model registry: one table of named sizes for every family in the zoo.

`MODELS[name]` is a `ModelSpec` (family, config overrides). Sizes follow the papers and the
official configs: BERT base/large (Devlin et al.), BiGS large = the released checkpoints
(23 layers, hidden 1024, intermediate 3072, N = 64; research/bigs.md §1.3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from flax import nnx

from bigs_jax.models import encoder


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: its frozen config dataclass and its model class."""

    name: str
    config_cls: type
    model_cls: Callable[..., nnx.Module]


FAMILIES: dict[str, Family] = {
    "encoder": Family("encoder", encoder.EncoderConfig, encoder.Encoder),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    overrides: Mapping[str, Any]


_BERT = dict(block="stack", mixer="attention")
_BIGS = dict(block="gated", mixer="ssm")
_BASE = dict(hidden_size=768, num_layers=12, intermediate_size=3072, num_heads=12)
_LARGE = dict(hidden_size=1024, num_layers=24, intermediate_size=4096, num_heads=16)
# The official BiGS size: a gated layer holds ~13.6M params, so 23 of them match BERT-large.
_BIGS_LARGE = dict(hidden_size=1024, num_layers=23, intermediate_size=3072, num_heads=16,
                   max_len=128, mlm_head_init_std=None)
_BIGS_BASE = dict(hidden_size=768, num_layers=12, intermediate_size=2304, num_heads=12,
                  mlm_head_init_std=None)
# Small sizes for CPU runs, smoke configs and tests.
_SMALL = dict(hidden_size=256, num_layers=4, intermediate_size=1024, num_heads=4, max_len=128)
_TINY = dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=2, max_len=128,
             ssm_state=16)

MODELS: dict[str, ModelSpec] = {}
for _size, _dims, _gated_dims in (("tiny", _TINY, _TINY), ("small", _SMALL, _SMALL),
                                  ("base", _BASE, _BIGS_BASE), ("large", _LARGE, _BIGS_LARGE)):
    MODELS[f"bert-{_size}"] = ModelSpec("encoder", {**_BERT, **_dims})
    MODELS[f"bigs-{_size}"] = ModelSpec("encoder", {**_BIGS, **_gated_dims})
    MODELS[f"stack-ssm-{_size}"] = ModelSpec("encoder", {"block": "stack", "mixer": "ssm",
                                                         **_dims})
    MODELS[f"gated-attention-{_size}"] = ModelSpec("encoder", {"block": "gated",
                                                               "mixer": "attention",
                                                               **_gated_dims})


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; unknown names fail listing the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
                         ) from None


def make_config(name: str, **overrides):
    """The frozen config of registry entry `name` with `overrides` applied."""
    spec = get_spec(name)
    family = FAMILIES[spec.family]
    fields = {f.name for f in dataclasses.fields(family.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; "
                         f"valid options: {', '.join(sorted(fields))}")
    return family.config_cls(**{**spec.overrides, **overrides})


def family_of(config) -> Family:
    """The family whose config class `config` is an instance of."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_cls):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a registered family")
