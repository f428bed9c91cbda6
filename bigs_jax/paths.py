"""Parameter paths: the one string form of a pytree key path, 'layers/3/fs4/A_re'.

Optimizer masks (path regexes in the config), the float32-parameter rule of `models.build`,
checkpoint matching and the converters' key maps all read parameters by this string.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax


def path_str(path: Sequence[Any]) -> str:
    """'layers/3/fs4/A_re' from a pytree key path (dict keys, sequence indices, attributes)."""
    parts = []
    for k in path:
        # nnx.State paths end in the Variable's `value` attribute; the parameter is its parent.
        # (A submodule named `value`, attention's v projection, is a dict key and stays.)
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def flat_paths(tree) -> dict[str, Any]:
    """{path string: leaf} of a pytree."""
    return {path_str(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}
