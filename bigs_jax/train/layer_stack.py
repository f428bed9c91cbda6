"""The optimizer update of a layer stack, computed on the layers' parameters stacked.

A model's blocks keep their parameters per layer (`layers/0/...`, `layers/1/...`: the tree
that checkpoints, converters, growth and freeze regexes read). An optimizer run over that tree
is one chain of elementwise ops per parameter and layer: AdamW over bigs-large's 608 leaves is
~7,000 HLO ops, and compiling them took as long as the whole scanned forward + backward.
`stacked(tx, stacks)` runs `tx` on a view of the trees in which each parameter kind of a
stack is one array with a leading layer axis (the view `run_layers(scan=True)` already
computes in), and hands back per-layer trees: its state, updates and interface are those of
`tx` on the per-layer tree, so nothing outside the train step sees a difference. AdamW is
elementwise, so its updates equal the per-layer ones to the last bit or so (XLA vectorizes
the same math differently for other shapes: 1 ulp seen); a global norm (clipping) sums in
another order.

Going into the view concatenates the layers (gradients, parameters, both moments); coming out
slices them again at runtime indices, so XLA compiles one kernel per parameter shape, not one
per parameter and layer. The price is those copies, every step: on XLA:CPU at batch 8 x 128,
bigs-large's scanned step took 16% longer and bert-large's 30%, with 2.2 GiB more temporaries
(`bench/compile.py --optimizer-steps`); their share falls as the batch grows (bert-base at
32 x 128: +6%). `train.py` uses the view with `--config.train.stacked_update=True`, for runs
whose compile time matters more than those copies (with `scan_layers`: bigs-large's step
compiles 3.15x faster than unrolled, against 1.6x for `scan_layers` alone).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

KEY = "layers"


class NotUniform(ValueError):
    """A label (optimizer group, decay mask) differs between the layers of a stack."""


@dataclasses.dataclass(frozen=True)
class LayerStacks:
    """Where a params tree (pure nested dicts) keeps its layer stacks: `paths[i]` leads to a
    dict {0: layer, 1: layer, ...} of `depths[i]` layers with equal trees and shapes."""

    paths: tuple[tuple, ...]
    depths: tuple[int, ...]

    @classmethod
    def find(cls, params) -> Optional["LayerStacks"]:
        """The stacks of `params` (every `layers` dict of two or more identical layers), or
        None where it has none."""
        found = []

        def walk(node, path):
            if not isinstance(node, dict):
                return
            for key, child in node.items():
                if key == KEY and _is_stack(child):
                    found.append(((*path, key), len(child)))
                else:
                    walk(child, (*path, key))

        walk(params, ())
        if not found:
            return None
        return cls(tuple(p for p, _ in found), tuple(n for _, n in found))

    def stack(self, tree):
        """`tree` (shaped like the params) with each stack's layers stacked: arrays along a
        new leading axis, labels (one value for all layers) once; NotUniform if they differ."""
        for path in self.paths:
            layers = _get(tree, path)
            tree = _set(tree, path, jax.tree.map(_stack_leaf, *[layers[i]
                                                               for i in range(len(layers))]))
        return tree

    def unstack(self, tree):
        """The inverse of `stack` for array trees; each layer is sliced at a runtime index, so
        the slices of one shape share one kernel."""
        for path, n in zip(self.paths, self.depths):
            stacked = _get(tree, path)
            index = jax.lax.optimization_barrier([jnp.asarray(i, jnp.int32) for i in range(n)])
            tree = _set(tree, path, {i: jax.tree.map(
                lambda x, j=j: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), stacked)
                for i, j in enumerate(index)})
        return tree

    def map_state(self, fn, state, *, stacked: bool):
        """`state` (an optax state) with `fn` applied to every subtree shaped like the params
        (per layer if not `stacked`, else stacked); other leaves (step counts) as they are."""
        is_params = lambda x: self._holds(x, stacked)
        return jax.tree.map(lambda x: fn(x) if is_params(x) else x, state, is_leaf=is_params)

    def _holds(self, node, stacked: bool) -> bool:
        for path in self.paths:
            sub = node
            for key in path:
                if not isinstance(sub, dict) or key not in sub:
                    return False
                sub = sub[key]
            if not isinstance(sub, dict) or stacked == _is_stack(sub):
                return False
        return True


class Stacked(optax.GradientTransformation):
    """A transformation of per-layer trees computed on stacked ones (`stacked`); `inner` and
    `stacks` let `apply_updates` add the updates before unstacking, too."""


def stacked(tx: optax.GradientTransformation, stacks: LayerStacks) -> Stacked:
    """`tx` (built for the stacked params: `stacks.stack` of its labels and masks) as a
    transformation of per-layer trees; see the module docstring."""

    def init(params):
        state = tx.init(stacks.stack(params))
        return stacks.map_state(stacks.unstack, state, stacked=True)

    def update(updates, state, params=None):
        state = stacks.map_state(stacks.stack, state, stacked=False)
        updates, state = tx.update(stacks.stack(updates), state,
                                   None if params is None else stacks.stack(params))
        return (stacks.unstack(updates),
                stacks.map_state(stacks.unstack, state, stacked=True))

    out = Stacked(init, update)
    out.inner, out.stacks = tx, stacks
    return out


def apply_updates(tx: optax.GradientTransformation, grads, opt_state, params):
    """(new params, new optimizer state) of one `tx` step: `optax.apply_updates` of
    `tx.update`, the sum taken on the stacked layers too where `tx` is `Stacked`."""
    if not isinstance(tx, Stacked):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    stacks = tx.stacks
    params = stacks.stack(params)
    updates, opt_state = tx.inner.update(
        stacks.stack(grads), stacks.map_state(stacks.stack, opt_state, stacked=False), params)
    return (stacks.unstack(optax.apply_updates(params, updates)),
            stacks.map_state(stacks.unstack, opt_state, stacked=True))


def _is_stack(node: Any) -> bool:
    if not isinstance(node, dict) or len(node) < 2 or set(node) != set(range(len(node))):
        return False
    first = jax.tree.structure(node[0])
    shapes = lambda t: [getattr(x, "shape", None) for x in jax.tree.leaves(t)]
    return all(jax.tree.structure(node[i]) == first and shapes(node[i]) == shapes(node[0])
               for i in range(1, len(node)))


def _stack_leaf(*xs):
    if hasattr(xs[0], "shape") and hasattr(xs[0], "dtype") and not isinstance(xs[0], bool):
        return jnp.stack(xs)
    if any(x != xs[0] for x in xs[1:]):
        raise NotUniform(f"layers differ: {xs}")
    return xs[0]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out
