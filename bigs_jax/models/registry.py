"""The model registry: `Family`, every family's named sizes by registry name, and `build`.

`MODELS[name]` is a `ModelSpec` (family, config overrides). Each family module holds its own
size table (`SIZES`); sizes follow the papers and the official configs. Family modules are
added with `register(module)`: `bigs_jax.models` registers the six model families,
`bigs_jax` (the package) registers the wrapper family `bigs_jax.fpt`, so the registry is
complete once anything of bigs_jax is imported. `build(config)` makes the randomly
initialized model of a frozen family config.
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.paths import path_str


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: its frozen config dataclass and its model class."""

    name: str
    config_cls: type
    model_cls: Callable[..., nnx.Module]
    # Regexes of parameter paths ('layers/0/mixer/...') stored in float32 whatever
    # `param_dtype` says: small generators whose rounding the outputs amplify.
    fp32_params: tuple[str, ...] = ()
    # Why the family cannot take packed rows (segment_ids), as the one-line error a run with
    # a packing task stops with; empty when it keeps packed examples apart.
    segments_refusal: str = ""
    # Run-level hooks of wrapper families (bigs_jax.fpt), which build their config from the
    # whole run config and restore `config.init` under their backbone's prefix:
    # config_from_run(run_config, data_overrides) -> config and
    # restore_init(run_config, params) -> (params, report). None for plain families.
    config_from_run: Optional[Callable] = None
    restore_init: Optional[Callable] = None

    @property
    def supports_segments(self) -> bool:
        return not self.segments_refusal


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    overrides: Mapping[str, Any]


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, ModelSpec] = {}


def register(module: ModuleType) -> None:
    """Adds a family module's family and its registry names (in the order of its `SIZES`).

    The module exposes FAMILY (its name), Config, Model and SIZES (registry name -> config
    overrides), and may expose FP32_PARAMS, SEGMENTS_REFUSAL and the run-level hooks of
    wrapper families (see Family).
    """
    FAMILIES[module.FAMILY] = Family(
        module.FAMILY, module.Config, module.Model,
        fp32_params=tuple(getattr(module, "FP32_PARAMS", ())),
        segments_refusal=getattr(module, "SEGMENTS_REFUSAL", ""),
        config_from_run=getattr(module, "model_config_from_run", None),
        restore_init=getattr(module, "restore_init", None))
    for name, overrides in module.SIZES.items():
        if name in MODELS:
            raise RuntimeError(f"registry name {name!r} defined twice")
        MODELS[name] = ModelSpec(module.FAMILY, dict(overrides))


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; unknown names fail listing the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
                         ) from None


# Sizes no model can have fewer than one of (a negative num_layers built an empty stack).
_POSITIVE = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
             "max_len")


def make_config(name: str, **overrides):
    """The frozen config of registry entry `name` with `overrides` applied."""
    spec = get_spec(name)
    family = FAMILIES[spec.family]
    fields = {f.name for f in dataclasses.fields(family.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; "
                         f"valid options: {', '.join(sorted(fields))}")
    small = [f"{k}={v}" for k, v in overrides.items()
             if k in _POSITIVE and isinstance(v, int) and not isinstance(v, bool) and v < 1]
    if small:
        raise ValueError(f"model {name!r}: {', '.join(small)} must be >= 1")
    return family.config_cls(**{**spec.overrides, **overrides})


def family_of(config) -> Family:
    """The family whose config class `config` is an instance of."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_cls):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a registered family")


def build(config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialized model from a frozen family config.

    Parameters are initialized in float32 and then stored in `config.param_dtype` (except the
    family's `fp32_params`), so a bfloat16 model starts from the rounded float32 initialization.
    """
    family = family_of(config)
    model = family.model_cls(config, rngs=nnx.Rngs(seed))
    param_dtype = jnp.dtype(config.param_dtype)
    if param_dtype != jnp.float32:
        keep = re.compile("|".join(family.fp32_params) or r"(?!)")

        def cast(path, x):
            if not jnp.issubdtype(x.dtype, jnp.floating) or keep.search(path_str(path)):
                return x
            return x.astype(param_dtype)

        nnx.update(model, jax.tree_util.tree_map_with_path(cast, nnx.state(model, nnx.Param)))
    return model
