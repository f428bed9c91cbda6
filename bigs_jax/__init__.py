"""bigs_jax: a JAX/Flax NNX model zoo for attention-free and transformer pretraining.

    import bigs_jax
    model = bigs_jax.create("bigs-large", max_len=128)   # registry name + overrides
    model = bigs_jax.load("WORKDIR")                     # a train.py / convert workdir
    out = model(input_ids, attention_mask=mask)          # out.hidden_states, out.logits
    emb = bigs_jax.embed(model, input_ids, mask)         # (B, E) pooled sentence embeddings
    bigs_jax.count_params(model)

The zoo is composed here: `bigs_jax.models` registers its model families, and this package
registers the wrapper family `bigs_jax.fpt` (a frozen backbone of any of them), so the
registry (`MODELS`) is complete whichever bigs_jax module is imported first.
"""

from __future__ import annotations

import jax
from flax import nnx

from bigs_jax import fpt
from bigs_jax.embedding import Pooling, embed, read_pooling
from bigs_jax.generation import GenerateOutput, generate
from bigs_jax.models import MODELS, build, make_config, register
from bigs_jax.models.outputs import ModelOutput
from bigs_jax.train.checkpointing import load_model, resolve

register(fpt)

__all__ = ["MODELS", "GenerateOutput", "ModelOutput", "Pooling", "build", "count_params",
           "create", "embed", "generate", "load"]


def create(name: str, *, seed: int = 0, **overrides) -> nnx.Module:
    """A randomly initialized model from the registry, e.g. `create("bigs-large", max_len=512)`.

    Unknown names or options fail with the list of valid ones (`bigs_jax.MODELS`).
    """
    return build(make_config(name, **overrides), seed=seed)


def load(path: str, step: int | None = None) -> nnx.Module:
    """The model stored in a workdir (latest step, or `step`) or in one checkpoint step dir.

    A workdir converted from a sentence-transformers model also records its pooling; the
    model carries it as `model.pooling`, which `embed` applies.
    """
    model = load_model(path, step=step)
    pooling = read_pooling(resolve(path, step)[0])
    if pooling is not None:
        model.pooling = pooling
    return model


def count_params(model: nnx.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
