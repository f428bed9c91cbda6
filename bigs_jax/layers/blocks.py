"""How a model runs its stack of blocks: rematerialization and activation sharding.

`block_call(remat, deterministic)` returns `call(layer, x, *args, rngs)`, the one way every
family (encoder, GPT-2, M2, ViT, M2-ViT) runs a block. It

- rematerializes the block per `REMAT[remat]` (what the block keeps for the backward pass);
- constrains the activations at the block's boundaries to the logical axes
  ('batch', 'length', 'embed'), resolved by the active `nnx.logical_axis_rules`, as big_vision
  and MaxText do, so XLA keeps the batch sharding between blocks instead of guessing. Under
  the default rules that is batch over (data, fsdp) and the rest replicated: a logical axis
  whose mesh axis is already taken (embed -> fsdp) stays unsharded. Outside a mesh, or without
  rules, the constraint is a no-op.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import linen, nnx
from flax.core import spmd

# Rematerialization policies by name: what each block keeps for the backward pass.
REMAT = {
    "none": None,                                                   # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,               # recompute the block
    "dots": jax.checkpoint_policies.dots_saveable,                  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Logical axes of the activations between blocks: (B, L, D) or (B, N, D) patches.
ACTIVATION_AXES = ("batch", "length", "embed")


def check_remat(remat: str) -> None:
    """Config validation: `remat` must name a policy of REMAT."""
    if remat not in REMAT:
        raise ValueError(f"unknown remat {remat!r}; choose one of {tuple(REMAT)}")


def constrain(x_BLD: jax.Array, axes: tuple = ACTIVATION_AXES) -> jax.Array:
    """`x_BLD` constrained to the mesh axes its logical `axes` map to; a no-op off a mesh."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x_BLD
    spec = linen.logical_to_mesh_axes(axes, rules)
    return jax.lax.with_sharding_constraint(x_BLD, spec)


def block_call(remat: str, deterministic: bool) -> Callable:
    """`call(layer, x, *args, rngs)` = constrain(layer(constrain(x), *args, deterministic=...,
    rngs=rngs)), rematerialized per `REMAT[remat]` unless 'none'.

    Positional `args` after `x` are the block's own (masks, segment ids); `rngs` is last.
    """
    check_remat(remat)

    def call(layer, x, *args):
        *args, rngs = args
        return constrain(layer(constrain(x), *args, deterministic=deterministic, rngs=rngs))

    if remat == "none":
        return call
    return nnx.remat(call, policy=REMAT[remat], prevent_cse=True)
