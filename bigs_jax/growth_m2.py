"""Function-preserving growth of M2 (Monarch Mixer) models, M2-BERT / M2-GPT and M2-ViT: MLP
width, MLP block count, hidden size, depth.

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
  * Hidden size h → ĥ = m·h, by duplication in blocks (derivation below).

Hidden size. The residual stream starts at the embeddings' LayerNorm output γ⊙n + β and every
layer ends in a LayerNorm (post-LN), so, as for BERT (`bigs_jax.growth`), no new parameters
make new channels mean-filled or zero: the only exact widening is duplication, ĥ = m·h. The
layout is fixed by the block-diagonal GLU: with K = `mlp_nblocks` and P = h/K, block k of
`gated_layers` reads channels [kP, (k+1)P) only, so the grown block k (ĥ/K channels) must hold
copies of old block k and of nothing else. The grown stream is therefore

    x̃[k, j, p] = x[k, p]      (k < K block, j < m copy, p < P),    written tile_K,m(x),

not [x, x] (which would put old blocks 0 and 1 into new block 0). Assume the layer input is
h̃ = tile(h). Then, parameter by parameter (a writer's new entries are copies, a reader's rows
are split at random into m parts, drawn from the grown model's init, that sum to the old row,
LEMON-style, so the copies get different gradients):

  * in_linear (D→3D): rows split, each of the three output groups [x1 | x2 | v] tiled, bias
    tiled per group, so z̃ = tile per group: Σ_j h[k,p]·part_j = h·W. The short conv, the
    gating v⊙x1, ⊙x2 and the skips D1, D2 are per channel: tiled parameters give tiled
    outputs. The pad mask is per position.
  * The implicit filters: z, freq and the filter MLP's hidden layers are shared by all
    channels and stay; the last layer (O→D) has its columns tiled, so each new channel's kernel
    is MLP(z[t])·W[:, c]·exp(-t|δ_c|) with W[:, c] its source's. The decay rate δ_c is not a
    parameter but a linspace over the channel count (`longconv.modulation_deltas`), which any
    new width would move for every old channel; the grown config records (K, m) in
    `decay_tiling`, and the rates are the pre-growth linspace laid out by tile_K,m: every
    channel keeps its rate exactly.
  * out_linear: rows split, columns and bias tiled: y·W exactly, tiled.
  * GLU: `gated_layers` (K, P, 2F/K) → (K, mP, 2F/K), each block's rows split into m parts:
    Σ_j x[k]·part_j = x[k]·W_k, the units unchanged. `wo` (K, F/K, P) → (K, F/K, mP), each
    block's columns tiled, bias tiled: wo(m) = tile(wo(m)).
  * LayerNorm of tile(v): mean and variance over ĥ = those over h, so LN(tile v) = tile LN(v)
    with γ, β tiled and the same ε (no rescale). Embedding tables are tiled writers.
  * Heads: the MLM transform and the poolers read (rows split) and write (tiled); a logit
    x̃·W̃ᵀ of a tied decoder sums m copies, so the LayerNorm that feeds it (the MLM head's norm,
    or the last layer's for M2-GPT's LM head) gets (γ, β)/m. Hidden states (heads "none",
    "pooler") are tile(h): the same function, laid out as above (`stream_index`).

By induction every layer maps tile(h) to tile(layer(h)): the grown model computes the same
function. The block count K stays fixed (ĥ/K = m·P; K still divides ĥ); to change it, merge
blocks (`mlp_nblocks`, applied before the width). ĥ not a multiple of h is refused.

M2-ViT (`bigs_jax.models.m2_vit`): pre-LN, x + Mixer(LN x), then x + Bd-MLP(LN x), with the
same sequence mixer over the patches, a GELU MLP of two block-diagonal matrices (`up` reads
block k's channels, `down` writes them), a final LayerNorm, the mean over patches and a linear
head. Its stream starts at the patch embedding (no LayerNorm), so a mean-fill would be possible
for LayerNorm alone, but a mean-filled channel of block k would have to be written by `down`
from every block's units, which a block-diagonal matrix cannot do: the width grows by the same
tiling. Patch and position embeddings are writers (tiled), the three LayerNorms per-channel
(tiled, same ε; no tied decoder), `up` a block reader (rows split), `down` a block writer, the
head a reader (rows split; the mean over patches is per channel). MLP width: unit j of chunk
c = j // (F/K) stays in block c; new `up` columns and biases from the init, new `down` rows
zero. Depth: a new layer with zero `out_linear` and `down` (kernels and biases) is the
identity, exactly (pre-LN: no LayerNorm to move).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

from bigs_jax import growth_rules as rules
from bigs_jax.growth_rules import GrowthError
from bigs_jax.layers.longconv import tile_channels
from bigs_jax.models import family_of

# The families grown here: M2-BERT / M2-GPT (`models.m2`) and M2-ViT (`models.m2_vit`).
FAMILIES = ("m2", "m2_vit")


def _vit(config) -> bool:
    return family_of(config).name == "m2_vit"


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
    """GLU (M2-ViT: MLP) width F → F̂ (module docstring)."""
    F, K = config.intermediate_size, config.mlp_nblocks
    if not getattr(config, "mlp", True):
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
    # GLU: gate then value halves; M2-ViT's GELU MLP has one set of units
    out_map = units if _vit(config) else np.concatenate([units, intermediate_size + units])
    for path, w in flat.items():
        if path.endswith(("mlp/gated_layers/kernel", "mlp/up/kernel")):
            flat[path] = _blockdiag_out(w, fresh[path], out_map)
        elif path.endswith("mlp/up/bias"):  # new units' biases free (the init's)
            b = fresh[path].astype(w.dtype).copy()
            b[units] = w
            flat[path] = b
        elif path.endswith(("mlp/wo/kernel", "mlp/down/kernel")):
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
        if re.search(r"mlp/(gated_layers|wo|up|down)/kernel$", path):
            flat[path] = _merge_blocks(w, K // mlp_nblocks)
    return new_config, rules._to_jax(rules._unflat(flat, keys))


def add_layers(config, params, num_layers: int, *, positions: Optional[list[int]] = None,
               seed: int = 0):
    """Depth N → N̂ with identity-initialized mixers (module docstring)."""
    N = config.num_layers
    positions = rules._layer_positions(N, num_layers, positions)
    vit = _vit(config)
    if not vit and config.mlp and not config.residual_long_conv:
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
                out[path] = (_new_vit_leaf if vit else _new_layer_leaf)(m.group(1), f, config)
        if not vit:
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


def _new_vit_leaf(rel: str, f: np.ndarray, config) -> np.ndarray:
    """M2-ViT is pre-LN (x + branch(LN x)): zero branch outputs make the layer the identity."""
    del config
    return np.zeros_like(f) if re.fullmatch(r"(mixer/out_linear|mlp/down)/(kernel|bias)",
                                            rel) else f


def _move_norm(out: dict, i: int, config) -> None:
    last = "mlp/norm" if config.mlp else "norm"
    prev = "embeddings/norm" if i == 0 else f"layers/{i - 1}/{last}"
    for leaf, unit in (("scale", 1.0), ("bias", 0.0)):
        unit = 0 if rules._INDEX_MODE else unit
        out[f"layers/{i}/{last}/{leaf}"] = out[f"{prev}/{leaf}"].copy()
        out[f"{prev}/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)
        if config.mixer_norm:
            out[f"layers/{i}/mixer/norm/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)


# ---------------------------------------------------------------------------- hidden size
# Axis roles: W a writer or per-channel parameter of the stream (copies), W3 three stream-sized
# groups (in_linear's x1, x2, v), R a reader (rows split), T a norm feeding a tied decoder
# (copies / m), Wb / Rb the within-block axis of a block-diagonal kernel (laid out (copy, p)).


# The sequence mixer, shared by M2-BERT/GPT and M2-ViT.
_MIXER_ROLES = [
    (r"mixer/in_linear/kernel$", ("R", "W3")),
    (r"mixer/(in_linear|short_filter)/bias$", ("W3",)),
    (r"mixer/short_filter/kernel$", (None, "W3")),
    (r"filter_fn2?/bias$", ("W",)),
    (r"filter_fn2?/implicit_filter(_rev)?/3/kernel$", (None, "W")),
    (r"filter_fn2?/(z|freq|implicit_filter(_rev)?/[012]/(kernel|bias))$", None),
    (r"mixer/out_linear/kernel$", ("R", "W")),
    (r"mixer/out_linear/bias$", ("W",)),
]
# M2-ViT: patch (and position) embeddings write the stream; its pre-LN norms and the final
# norm are per channel; the block-diagonal MLP reads (up) and writes (down) within blocks;
# the head reads the mean-pooled final norm output.
_VIT_ROLES = [
    (r"^patch_embed/kernel$", (None, None, None, "W")),
    (r"^(patch_embed/bias)$", ("W",)),
    (r"^position$", (None, "W")),
    (r"(^|/)(mixer_norm|mlp_norm|final_norm)/(scale|bias)$", ("W",)),
    (r"mlp/up/kernel$", (None, "Rb", None)),
    (r"mlp/up/bias$", None),
    (r"mlp/down/kernel$", (None, None, "Wb")),
    (r"mlp/down/bias$", ("W",)),
    (r"^head/kernel$", ("R", None)),
    (r"^head/bias$", None),
]


def _hidden_roles(config, path: str) -> tuple:
    if _vit(config):
        table = _MIXER_ROLES + _VIT_ROLES
    else:
        last = config.num_layers - 1
        tied = (config.head == "lm" and re.fullmatch(
            rf"layers/{last}/(mlp/)?norm/(scale|bias)", path)) or path.startswith(
            "mlm_head/norm/")
        table = _MIXER_ROLES + [
            (r"^embeddings/(word|position|token_type)/embedding$", (None, "W")),
            (r"(^|/)norm/(scale|bias)$", ("T",) if tied else ("W",)),
            (r"mlp/gated_layers/kernel$", (None, "Rb", None)),
            (r"mlp/wo/kernel$", (None, None, "Wb")),
            (r"^(mlm_head/transform|classifier/pooler|pooler)/kernel$", ("R", "W")),
            (r"^(mlm_head/transform|classifier/pooler|pooler)/bias$|wo/bias$", ("W",)),
            (r"^classifier/classifier/kernel$", ("R", None)),
            (r"^(classifier/classifier|mlm_head)/bias$", None),
        ]
    for pattern, roles in table:
        if re.search(pattern, path):
            return roles
    raise RuntimeError(f"M2 hidden growth has no rule for parameter {path}; "
                       "bigs_jax.growth_m2 must be updated for this model")


def _grouped(fn, w: np.ndarray, axis: int, groups: int, *rest) -> np.ndarray:
    """fn applied to `w` with `axis` viewed as (groups, size/groups), then merged back."""
    shape = list(w.shape)
    w_g = w.reshape(shape[:axis] + [groups, shape[axis] // groups] + shape[axis + 1:])
    out = fn(w_g, axis + 1, *rest)
    return out.reshape(shape[:axis] + [-1] + shape[axis + 1:])


def _copies(w: np.ndarray, axis: int, m: int) -> np.ndarray:
    """m copies along `axis`; in index mode the copies are new entries (0)."""
    rest = np.zeros_like(w) if rules._INDEX_MODE else w
    return np.concatenate([w] + [rest] * (m - 1), axis=axis)


def _split(w: np.ndarray, axis: int, f: np.ndarray, m: int) -> np.ndarray:
    """Rows along `axis` split into m random parts (from `f`, the grown init) summing to w."""
    return rules._split_rows(w, f, axis, m)


def _grow_stream_axis(w, f, axis, role, K, m):
    if role in ("W", "T", "W3"):
        out = _grouped(_copies, w, axis, 3 * K if role == "W3" else K, m)
        if role == "T" and not rules._INDEX_MODE:
            out = (out.astype(np.float64) / m).astype(w.dtype)
        return out
    if role == "Wb":
        return _copies(w, axis, m)
    groups = K if role == "R" else 1
    shape = list(f.shape)
    f_g = f.reshape(shape[:axis] + [groups, shape[axis] // groups] + shape[axis + 1:])
    w_g = w.reshape(shape[:axis] + [groups, w.shape[axis] // groups] + shape[axis + 1:])
    return _split(w_g, axis + 1, f_g, m).reshape(shape[:axis] + [-1] + shape[axis + 1:])


def expand_hidden(config, params, hidden_size: int, *, seed: int = 0):
    """Width h → ĥ = m·h by duplication in blocks (module docstring); `bigs_jax.growth`
    checks that ĥ is a multiple of h."""
    h, K = config.hidden_size, config.mlp_nblocks
    m = hidden_size // h
    new_config = dataclasses.replace(config, hidden_size=hidden_size,
                                     decay_tiling=config.decay_tiling + ((K, m),))
    if rules._CONFIG_MODE:
        return new_config, params
    fresh, keys = rules._fresh(new_config, seed)
    out = {}
    for path, w in rules._flat(params).items():
        roles = _hidden_roles(config, path) or (None,) * w.ndim
        if len(roles) != w.ndim:
            raise RuntimeError(f"M2 hidden growth: {path} has {w.ndim} axes, its rule "
                               f"{len(roles)}")
        for axis, role in enumerate(roles):
            if role is not None:
                w = _grow_stream_axis(w, rules._crop(fresh[path], w, axis), axis, role, K, m)
        if w.shape != fresh[path].shape:
            raise RuntimeError(f"M2 hidden growth: {path} grew to {w.shape}, the grown model "
                               f"has {fresh[path].shape}")
        out[path] = w
    return new_config, rules._to_jax(rules._unflat(out, keys))


def stream_index(config, hidden_size: int) -> np.ndarray:
    """(ĥ,) the old channel that each channel of `config`'s stream grown to `hidden_size`
    copies: the grown model's hidden states are the old ones [..., stream_index]."""
    m = hidden_size // config.hidden_size
    return tile_channels(np.arange(config.hidden_size), ((config.mlp_nblocks, m),))
