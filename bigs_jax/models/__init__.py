"""The model registry: every family's named sizes, by registry name.

`MODELS[name]` is a `ModelSpec` (family, config overrides). Each family module holds its own
size table (`SIZES`); sizes follow the papers and the official configs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: its frozen config dataclass and its model class."""

    name: str
    config_cls: type
    model_cls: Callable[..., nnx.Module]
    # Regexes of parameter paths ('layers/0/mixer/...') stored in float32 whatever
    # `param_dtype` says: small generators whose rounding the outputs amplify.
    fp32_params: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    overrides: Mapping[str, Any]


# One module per family; each exposes FAMILY (its name), Config, Model and SIZES
# (registry name -> config overrides), and may expose FP32_PARAMS (see Family). Dotted names
# are modules outside bigs_jax.models (wrappers around the other families: bigs_jax.fpt).
FAMILY_MODULES = ("encoder", "gpt2", "m2", "vit", "m2_vit", "bigs_jax.fpt")

FAMILIES: dict[str, Family] = {}
MODELS: dict[str, ModelSpec] = {}
for _module in FAMILY_MODULES:
    _m = importlib.import_module(_module if "." in _module else f"bigs_jax.models.{_module}")
    FAMILIES[_m.FAMILY] = Family(_m.FAMILY, _m.Config, _m.Model,
                                 tuple(getattr(_m, "FP32_PARAMS", ())))
    for _name, _overrides in _m.SIZES.items():
        if _name in MODELS:
            raise RuntimeError(f"registry name {_name!r} defined twice")
        MODELS[_name] = ModelSpec(_m.FAMILY, dict(_overrides))


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
