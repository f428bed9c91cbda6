"""Position-wise feed-forward block: Dense(D→F), activation, Dense(F→D), dropout.

Dimension key: B batch, L length, D model, F mlp.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.linear import Dtype, activation, dense


class MLP(nnx.Module):
    """The transformer feed-forward block (BERT's intermediate + output dense)."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        act: str = "gelu",
        dropout: float = 0.0,
        init_std: float = 0.02,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(rngs=rngs, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
        self.up = dense(features, hidden, ("embed", "mlp"), **kw)
        self.down = dense(hidden, features, ("mlp", "embed"), **kw)
        self.act = activation(act)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x_BLD: jax.Array, *, deterministic: bool = True,
                 rngs: Optional[nnx.Rngs] = None) -> jax.Array:
        h_BLF = self.act(self.up(x_BLD))
        return self.dropout(self.down(h_BLF), deterministic=deterministic, rngs=rngs)
