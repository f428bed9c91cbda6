"""Function-preserving growth of M2 (Monarch Mixer) models: MLP width, MLP block count, depth.

The rules of `bigs_jax.growth` (Gesmundo & Maile, arXiv 2308.06103) adapted to the M2 layer
(`bigs_jax.models.m2`), whose MLP is a block-diagonal GLU and which has no residual around
the layer (the mixer's long convolution and skip carry the input):

  * MLP width F → F̂: unit j of the GLU (gate j, value j, row j of `wo`) must keep the input
    block it reads and the output block it writes. Units come in K chunks of F/K (one per
    `wo` block), so new units go at the end of each chunk; new gate/value columns are random,
    new `wo` rows zero.
  * Block count K → K' (K' dividing K): a K-block diagonal matrix is a K'-block diagonal one
    whose merged blocks have zero off-diagonal parts; unit order is unchanged.
  * Depth: a new layer's mixer is set to the identity (filters' last layers and `filter_fn`'s
    skip zero, so the gated branch is 0; `filter_fn2`'s skip 1 and `out_linear` = I carry the
    input), its MLP output `wo` zero, and, as for post-LN BERT, the preceding LayerNorm's
    (γ, β) move into the new layer's norm: identity up to a relative ε/2.
    With `mlp=False` the layer is LN(h + mixer(h)), so there the mixer output is zeroed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

from bigs_jax import growth_rules as rules
from bigs_jax.growth_rules import GrowthError


def _units_map(F: int, F_new: int, K: int) -> np.ndarray:
    """New index of each old GLU unit: chunk c = j // (F/K) keeps its offset in new chunk c."""
    j = np.arange(F)
    c, r = j // (F // K), j % (F // K)
    return c * (F_new // K) + r


def _blockdiag_out(w_KPQ: np.ndarray, fresh_KPQ: np.ndarray, out_map: np.ndarray) -> np.ndarray:
    """A block-diagonal kernel whose old outputs o move to out_map[o] (same block); the rest
    of the grown kernel comes from `fresh`."""
    K, P, Q = w_KPQ.shape
    Qn = fresh_KPQ.shape[2]
    out = fresh_KPQ.astype(w_KPQ.dtype).copy()
    o = np.arange(K * Q)
    new = out_map[o]
    if np.any(new // Qn != o // Q):
        raise RuntimeError("M2 MLP growth moved a unit across blocks")
    out[new // Qn, :, new % Qn] = w_KPQ[o // Q, :, o % Q]
    return out


def expand_mlp(config, params, intermediate_size: int, *, seed: int = 0):
    """GLU width F → F̂ (module docstring)."""
    F, K = config.intermediate_size, config.mlp_nblocks
    if not config.mlp:
        raise GrowthError("intermediate_size: this M2 model has mlp=False; there is no MLP "
                          "to widen")
    if intermediate_size % K:
        raise GrowthError(f"intermediate_size {intermediate_size} must be a multiple of "
                          f"mlp_nblocks {K}")
    new_config = dataclasses.replace(config, intermediate_size=intermediate_size)
    if rules._CONFIG_MODE:
        return new_config, params
    fresh, keys = rules._fresh(new_config, seed)
    flat = rules._flat(params)
    units = _units_map(F, intermediate_size, K)
    out_map = np.concatenate([units, intermediate_size + units])  # gate then value halves
    for path, w in flat.items():
        if path.endswith("mlp/gated_layers/kernel"):
            flat[path] = _blockdiag_out(w, fresh[path], out_map)
        elif path.endswith("mlp/wo/kernel"):
            pad = fresh[path].shape[1] - w.shape[1]
            flat[path] = np.concatenate([w, np.zeros((K, pad, w.shape[2]), w.dtype)], axis=1)
    return new_config, rules._to_jax(rules._unflat(flat, keys))


def _merge_blocks(w_KPQ: np.ndarray, r: int) -> np.ndarray:
    K, P, Q = w_KPQ.shape
    out = np.zeros((K // r, r * P, r * Q), w_KPQ.dtype)
    for k in range(K):
        out[k // r, (k % r) * P:(k % r + 1) * P, (k % r) * Q:(k % r + 1) * Q] = w_KPQ[k]
    return out


def merge_mlp_blocks(config, params, mlp_nblocks: int, *, seed: int = 0):
    """Block count K → K' < K (K' dividing K): denser MLP projections, zero off-diagonal."""
    del seed  # nothing random: the new entries are the zero off-diagonal blocks
    K = config.mlp_nblocks
    if mlp_nblocks > K or K % mlp_nblocks:
        raise GrowthError(f"mlp_nblocks {mlp_nblocks}: growth merges blocks, so it must "
                          f"divide the model's {K} (fewer blocks = more parameters)")
    new_config = dataclasses.replace(config, mlp_nblocks=mlp_nblocks)
    if rules._CONFIG_MODE:
        return new_config, params
    flat, keys = rules._flat(params), rules._keys(params)
    for path, w in flat.items():
        if re.search(r"mlp/(gated_layers|wo)/kernel$", path):
            flat[path] = _merge_blocks(w, K // mlp_nblocks)
    return new_config, rules._to_jax(rules._unflat(flat, keys))


def add_layers(config, params, num_layers: int, *, positions: Optional[list[int]] = None,
               seed: int = 0):
    """Depth N → N̂ with identity-initialized mixers (module docstring)."""
    N = config.num_layers
    positions = rules._layer_positions(N, num_layers, positions)
    if config.mlp and not config.residual_long_conv:
        raise GrowthError("num_layers: an M2 layer without residual_long_conv has no path "
                          "that can carry its input, so no new layer is the identity")
    new_config = dataclasses.replace(config, num_layers=num_layers)
    if rules._CONFIG_MODE:
        return new_config, params
    fresh, keys = rules._fresh(new_config, seed)
    out, _ = rules._reindex_layers(rules._flat(params), num_layers, positions)
    for i in positions:
        for path, f in fresh.items():
            m = re.match(rf"^layers/{i}/(.*)$", path)
            if m:
                out[path] = _new_layer_leaf(m.group(1), f, config)
        _move_norm(out, i, config)
    return new_config, rules._to_jax(rules._unflat(out, keys))


def _new_layer_leaf(rel: str, f: np.ndarray, config) -> np.ndarray:
    if config.mlp:
        if re.fullmatch(r"mlp/wo/(kernel|bias)|mixer/filter_fn/bias|mixer/out_linear/bias"
                        r"|mixer/filter_fn/implicit_filter(_rev)?/3/kernel"
                        r"|mixer/filter_fn2/implicit_filter(_rev)?/3/kernel", rel):
            return np.zeros_like(f)
        if rules._INDEX_MODE:
            return np.zeros_like(f)
        if rel == "mixer/filter_fn2/bias":
            return np.ones_like(f)
        if rel == "mixer/out_linear/kernel":
            return np.eye(*f.shape, dtype=f.dtype)
        return f
    # mlp=False: out = LN(h + mixer(h)); a zero mixer output leaves LN(h).
    return np.zeros_like(f) if re.fullmatch(r"mixer/out_linear/(kernel|bias)", rel) else f


def _move_norm(out: dict, i: int, config) -> None:
    last = "mlp/norm" if config.mlp else "norm"
    prev = "embeddings/norm" if i == 0 else f"layers/{i - 1}/{last}"
    for leaf, unit in (("scale", 1.0), ("bias", 0.0)):
        unit = 0 if rules._INDEX_MODE else unit
        out[f"layers/{i}/{last}/{leaf}"] = out[f"{prev}/{leaf}"].copy()
        out[f"{prev}/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)
        if config.mixer_norm:
            out[f"layers/{i}/mixer/norm/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)
