"""bigs_jax: a JAX/Flax NNX model zoo for attention-free and transformer pretraining.

    import bigs_jax
    model = bigs_jax.create("bigs-large", max_len=128)   # registry name + overrides
    model = bigs_jax.load("WORKDIR")                     # a train.py / convert workdir
    out = model(input_ids, attention_mask=mask)          # out.hidden_states, out.logits
    bigs_jax.count_params(model)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.models import MODELS, family_of, make_config
from bigs_jax.models.outputs import ModelOutput

__all__ = ["MODELS", "ModelOutput", "build", "count_params", "create", "load"]


def build(config, *, seed: int = 0) -> nnx.Module:
    """A randomly initialized model from a frozen family config.

    Parameters are initialized in float32 and then stored in `config.param_dtype` (except the
    family's FP32_PARAMS), so a bfloat16 model starts from the rounded float32 initialization.
    """
    family = family_of(config)
    model = family.model_cls(config, rngs=nnx.Rngs(seed))
    param_dtype = jnp.dtype(config.param_dtype)
    if param_dtype != jnp.float32:
        keep = re.compile("|".join(family.fp32_params) or r"(?!)")

        def cast(path, x):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if not jnp.issubdtype(x.dtype, jnp.floating) or keep.search(name):
                return x
            return x.astype(param_dtype)

        nnx.update(model, jax.tree_util.tree_map_with_path(cast, nnx.state(model, nnx.Param)))
    return model


def create(name: str, *, seed: int = 0, **overrides) -> nnx.Module:
    """A randomly initialized model from the registry, e.g. `create("bigs-large", max_len=512)`.

    Unknown names or options fail with the list of valid ones (`bigs_jax.MODELS`).
    """
    return build(make_config(name, **overrides), seed=seed)


def load(path: str, step: int | None = None) -> nnx.Module:
    """The model stored in a workdir (latest step, or `step`) or in one checkpoint step dir."""
    from bigs_jax.train import checkpointing  # orbax is heavy; import on use

    return checkpointing.load_model(path, step=step)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
