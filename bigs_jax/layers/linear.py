"""Dense and LayerNorm factories that attach logical sharding axes.

Every weight in the zoo carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...);
the mesh rules in the config turn them into mesh axes. Model code never names a mesh axis.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def sharded(axes: Sequence[Optional[str]]) -> dict:
    """Variable metadata naming the logical axes of a parameter.

    Eager sharding is off: parameters are placed by the trainer (abstract init → shardings →
    jitted init), so models can also be built outside any mesh, e.g. in tests or notebooks.
    """
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def dense(
    in_features: int,
    out_features: int,
    axes: Sequence[Optional[str]],
    *,
    rngs: nnx.Rngs,
    init_std: Optional[float] = 0.02,
    use_bias: bool = True,
    dtype: Optional[Dtype] = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """A `nnx.Linear` with kernel (in, out) named `axes` and bias named `axes[1]`.

    Args:
      init_std: standard deviation of the normal kernel init (BERT/BiGS use 0.02);
        None selects Flax's default lecun-normal init (the official BiGS MLM-head dense).
    """
    kernel_init = (
        jax.nn.initializers.normal(init_std) if init_std is not None
        else jax.nn.initializers.lecun_normal()
    )
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        rngs=rngs,
        kernel_metadata=sharded(axes),
        bias_metadata=sharded((axes[1],)),
    )


def layer_norm(
    features: int,
    *,
    eps: float,
    rngs: nnx.Rngs,
    axis: Optional[str] = "embed",
    dtype: Optional[Dtype] = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.LayerNorm:
    """LayerNorm over the last axis; statistics in fp32 whatever the compute dtype."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,  # two-pass variance: matches PyTorch/HF to the last ulp
        rngs=rngs,
        scale_metadata=sharded((axis,)),
        bias_metadata=sharded((axis,)),
    )


def gelu_exact(x: jax.Array) -> jax.Array:
    """erf GELU (BERT, the MLM head of BiGS, HF `gelu`)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximated GELU (inside the BiGS block: Flax's default `nn.gelu`; GPT-2)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"gelu": gelu_exact, "gelu_tanh": gelu_tanh, "gelu_new": gelu_tanh,
               "relu": jax.nn.relu}


def activation(name: str):
    """Activation by its HF-style name; unknown names fail listing the valid ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
