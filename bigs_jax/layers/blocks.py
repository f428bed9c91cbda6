"""How a model runs its stack of blocks: rematerialization and activation sharding.

`run_layers(layers, x, *args, rngs=, remat=, deterministic=, scan=)` is the one way every
family (encoder, GPT-2, bigs-lm, M2, ViT, M2-ViT, FPT's vision backbones) runs its stack. Each
block goes through `block_call(remat, deterministic)`, which

- rematerializes the block per `REMAT[remat]` (what the block keeps for the backward pass);
- constrains the activations at the block's boundaries to the logical axes
  ('batch', 'length', 'embed'), resolved by the active `nnx.logical_axis_rules`, as big_vision
  and MaxText do, so XLA keeps the batch sharding between blocks instead of guessing. Under
  the default rules that is batch over (data, fsdp) and the rest replicated: a logical axis
  whose mesh axis is already taken (embed -> fsdp) stays unsharded. Outside a mesh, or without
  rules, the constraint is a no-op.

With `scan=False` the blocks run in a Python loop: XLA compiles each one, so compile time grows
with depth. With `scan=True` they run as one `jax.lax.scan` over the blocks' states stacked
along a new leading axis (logical axis 'layers'), so one block is compiled whatever the depth.
The parameter tree is the same either way (the stack is built inside the forward from the
per-layer modules, and its gradient flows back to them), so checkpoints, converters, growth
and freeze regexes never see the difference. Dropout draws one key from `rngs` and gives each
block its own split of it, so a scanned training run draws other (equally valid) masks than
a looped one; deterministic outputs and gradients agree to fp32 rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
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


def per_shard(fn: Callable, in_axes: Sequence[tuple], out_axes: tuple) -> Callable:
    """`fn` run by `jax.shard_map` on each device's shard of its arguments, their logical
    `in_axes` (one tuple per argument) and the result's `out_axes` mapped to mesh axes as
    `constrain` maps them; `fn` itself off a mesh, or where a sharded dimension does not
    divide evenly.

    For ops XLA's SPMD partitioner does not partition along their batch-like dimensions:
    it all-gathers an FFT's operand even when only channels are sharded, and on XLA:CPU the
    gathered layout then fails the FFT's layout check (`fft_thunk.cc` RET_CHECK) in the
    backward pass. Each shard's FFT is independent, so `fn` must be elementwise in every
    dimension the mesh shards.
    """
    def call(*args):
        rules = spmd.get_logical_axis_rules()
        mesh = jax.sharding.get_abstract_mesh()
        if not rules or mesh.empty:
            return fn(*args)
        specs = [linen.logical_to_mesh_axes(axes, rules) for axes in in_axes]
        for x, spec in zip(args, specs, strict=True):
            for size, names in zip(x.shape, spec):
                names = () if names is None else (names,) if isinstance(names, str) else names
                if size % math.prod(mesh.shape[n] for n in names):
                    return fn(*args)
        return jax.shard_map(fn, in_specs=tuple(specs),
                             out_specs=linen.logical_to_mesh_axes(out_axes, rules))(*args)

    return call


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


def run_layers(layers: Sequence[nnx.Module], x: jax.Array, *args, rngs: Optional[nnx.Rngs],
               remat: str, deterministic: bool, scan: bool) -> jax.Array:
    """`x` after every block of `layers` in order, each called as `block(x, *args,
    deterministic=..., rngs=...)` through `block_call`; by `jax.lax.scan` if `scan`."""
    if not scan:
        call = block_call(remat, deterministic)
        for layer in layers:
            x = call(layer, x, *args, rngs)
        return x
    check_remat(remat)
    graphdef, stacked = stack_layers(layers)
    keys = None
    if rngs is not None and not deterministic:
        keys = jax.random.split(rngs.dropout(), len(layers))

    def body(x, state_and_key):
        state, key = state_and_key
        block = nnx.merge(graphdef, state)
        block_rngs = None if key is None else nnx.Rngs(dropout=key)
        return constrain(block(constrain(x), *args, deterministic=deterministic,
                               rngs=block_rngs)), None

    if remat != "none":
        # scan already keeps XLA from merging the recomputation into the forward
        body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x


def stack_layers(layers: Sequence[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """(the blocks' one graphdef, their states stacked on a new leading axis), each stacked
    leaf constrained to ('layers', *its own logical axes) so FSDP/tensor shards stay put."""
    if not len(layers):
        raise ValueError("scan_layers needs at least one layer; set scan_layers=False")
    graphdef, first = nnx.split(layers[0])
    shapes = lambda state: [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
    states = [first]
    for i, layer in enumerate(layers[1:], start=1):
        g, state = nnx.split(layer)
        if g != graphdef or shapes(state) != shapes(first):
            raise ValueError(f"scan_layers needs blocks of one structure, but layer {i} differs "
                             f"from layer 0; set scan_layers=False for this model")
        states.append(state)

    def stack(*vs):
        names = tuple(vs[0].get_metadata().get("out_sharding") or ())
        x = _stack(*[v[...] for v in vs])
        return vs[0].replace(constrain(x, ("layers", *names)) if names else x)

    is_var = lambda v: isinstance(v, nnx.Variable)
    return graphdef, jax.tree.map(stack, *states, is_leaf=is_var)


@jax.custom_vjp
def _stack(*xs: jax.Array) -> jax.Array:
    """jnp.stack(xs), whose gradient is unstacked by dynamic slices at runtime indices.

    The plain transpose of a stack is one static slice per layer, and XLA:CPU compiles each
    (with whatever it fuses into it) as its own kernel, per parameter and layer, where the
    unrolled model's identical layers share kernels: a scanned bert-small (8 layers) forward +
    backward compiled 4x slower than the unrolled one that way, 2x with this. With the index a
    runtime value (hidden behind an optimization barrier) the layers' slices are one kernel.
    Forward-mode differentiation (jax.jvp) of a scanned model is therefore not supported.
    """
    return jnp.stack(xs)


def _stack_fwd(*xs):
    return jnp.stack(xs), None


def _stack_bwd(_, g):
    # one scalar per layer (not slices of one iota, which XLA would fuse back in as constants)
    index = jax.lax.optimization_barrier([jnp.asarray(i, jnp.int32) for i in range(len(g))])
    return tuple(jax.lax.dynamic_index_in_dim(g, i, keepdims=False) for i in index)


_stack.defvjp(_stack_fwd, _stack_bwd)
