"""Function-preserving growth: the six composable expansions, for every family of the zoo.

Gesmundo & Maile, "Composable Function-preserving Expansions for Transformer Architectures",
arXiv 2308.06103 (research/fpt_growth.md §2). Each expansion maps (config, params) of a model
to (config, params) of a larger one computing the same function: MLP width
(`intermediate_size`), head addition (`num_heads`), value head size (`v_head_dim`), key/query
head size (`qk_head_dim`), hidden size (`hidden_size`) and depth (`num_layers`), plus the SSM
state size of BiGS (`ssm_state`). `params` is the pure dict `nnx.to_pure_dict(nnx.state(m))`
(the train loop's `TrainState.params`).

Blocks the theorem leaves free are drawn from the grown model's own random init (so new units
differ); blocks it constrains are zero; nothing is a constant placeholder.

Hidden size, by normalization (§2.5):
  * "zero" (pre-RMSNorm, the paper): new residual dims are 0; norm scales × √(h/ĥ), ε·h/ĥ.
  * "mean" (pre-LayerNorm with no norm on the embeddings: GPT-2, ViT): new residual dims hold
    the mean of the old ones (every writer's new columns = mean of its old columns), so LN sees
    the same mean and a variance × h/ĥ: scales × √(h/ĥ), ε·h/ĥ, new biases 0. Zero padding
    would shift the LN mean and is not exact.
  * "duplicate" (any LayerNorm; required by BERT, BiGS and the ablations, whose residual stream
    starts at the embeddings' LayerNorm output γ⊙n + β, which is not mean-filled for any
    choice of new parameters, and by post-LN blocks): ĥ = m·h and the stream is [x, x, ...].
    Writers' columns are tiled; readers' rows are split at random into m parts that sum to the
    old rows (LEMON-style), which breaks the copies' symmetry; LN of a tiled vector is the
    tiled LN (same ε); the norm feeding a tied decoder is divided by m.

Depth: a new pre-norm layer has zero output projections (attention out, MLP down, BiGS `do`)
and is the identity. A post-LN layer (BERT) cannot be: LN(x + 0) ≠ x. We insert it with zero
branches and move the previous LayerNorm's (γ, β) into the new layer's last norm, the previous
one becoming (1, 0); the function then differs only by one extra normalization of an already
normalized vector, a relative change of about ε/2 (1e-12 for BERT; below float32 rounding).
Exactly the identity is impossible with one shared ε: composing the norms exactly needs the
previous norm's ε above 1 (derivation in the README's growth section).

M2 and M2-ViT (`bigs_jax.growth_m2`) have MLP width, block merging, depth and hidden size
(duplication in the blocks of the block-diagonal MLP, the filters' decay rates kept by the
config's `decay_tiling`); their mixer has no attention heads, so heads, qk and v sizes are
refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Optional

import numpy as np

from bigs_jax import growth_m2
from bigs_jax import growth_rules as rules
from bigs_jax.growth_rules import (GrowthError, _Arch, _arch, _flat, _flat_np, _fresh,
                                   _grow_leaf, _head_dims, _keys, _layer_positions,
                                   _reindex_layers, _replace, _roles, _to_jax, _unflat)

# Application order of `grow_params`: per-layer widths first, then the residual width, then depth.
SIZE_FIELDS = ("intermediate_size", "mlp_nblocks", "num_heads", "qk_head_dim", "v_head_dim",
               "ssm_state", "hidden_size", "num_layers")
HIDDEN_MODES = ("mean", "zero", "duplicate")


@contextlib.contextmanager
def _index_mode():
    """Index mode (`growth_rules._INDEX_MODE`) for the duration of the block."""
    rules._INDEX_MODE = True
    try:
        yield
    finally:
        rules._INDEX_MODE = False


# ---------------------------------------------------------------------------- helpers


def _apply(config, params, new_config, kind, ctx, seed):
    if rules._CONFIG_MODE:
        return new_config, params
    arch = _arch(config)
    flat, keys = _flat(params), _keys(params)
    fresh, _ = _fresh(new_config, seed)
    out = {}
    for path, w in flat.items():
        if path not in fresh:
            raise RuntimeError(f"growth: {path} is missing from the grown model")
        roles = _roles(arch, config, path, w.ndim)
        g = _grow_leaf(path, w, fresh[path], roles, kind, ctx)
        if g.shape != fresh[path].shape:
            raise RuntimeError(f"growth: {path} grew to {g.shape}, the grown model has "
                               f"{fresh[path].shape}")
        out[path] = g
    return new_config, _to_jax(_unflat(out, keys))


def _check_larger(config, field, new, current):
    if new < current:
        raise GrowthError(f"{field} {new} is smaller than the model's {current}; growth only "
                          "enlarges a model")


# ---------------------------------------------------------------------------- the expansions


def expand_mlp(config, params, intermediate_size: int, *, seed: int = 0):
    """MLP width F → F̂ (Thm 3.1): new input columns random, new output rows zero."""
    arch = _arch(config)
    current = getattr(config, "mlp_size", None) or config.intermediate_size
    _check_larger(config, "intermediate_size", intermediate_size, current)
    if arch.family in growth_m2.FAMILIES:
        return growth_m2.expand_mlp(config, params, intermediate_size, seed=seed)
    new = _replace(config, intermediate_size=intermediate_size)
    return _apply(config, params, new, "mlp", {}, seed)


def merge_mlp_blocks(config, params, mlp_nblocks: int, *, seed: int = 0):
    """M2 only: fewer, larger diagonal blocks in the MLP projections (zero off-diagonal)."""
    if _arch(config).family not in growth_m2.FAMILIES:
        raise GrowthError("mlp_nblocks: only M2 models have block-diagonal MLPs")
    return growth_m2.merge_mlp_blocks(config, params, mlp_nblocks, seed=seed)


def _need_attention(config, what: str):
    arch = _arch(config)
    if not arch.attention:
        raise GrowthError(f"{what}: this {arch.family} model has no attention heads "
                          f"(mixer {getattr(config, 'mixer', 'M2')}); grow intermediate_size, "
                          + ("mlp_nblocks, " if arch.family in growth_m2.FAMILIES else "")
                          + "hidden_size, num_layers" + (" or ssm_state" if arch.ssm else ""))


def add_heads(config, params, num_heads: int, *, seed: int = 0):
    """Attention heads E → Ê (Thm 3.2): new heads random, their output-projection rows zero."""
    _need_attention(config, "num_heads")
    _check_larger(config, "num_heads", num_heads, config.num_heads)
    new = _replace(config, num_heads=num_heads)
    return _apply(config, params, new, "heads", {}, seed)


def expand_keys(config, params, qk_head_dim: int, *, seed: int = 0):
    """Query/key head size k → k̂ (Thm 3.4): new query columns random, new key columns zero,
    old key weights and biases × √(k̂/k)."""
    _need_attention(config, "qk_head_dim")
    k, _ = _head_dims(config)
    _check_larger(config, "qk_head_dim", qk_head_dim, k)
    new = _replace(config, qk_head_dim=qk_head_dim)
    return _apply(config, params, new, "qk",
                  {"heads": config.num_heads, "old": k, "new": qk_head_dim}, seed)


def expand_values(config, params, v_head_dim: int, *, seed: int = 0):
    """Value head size v → v̂ (Thm 3.3): new value columns random, and inside each head's block
    of the output projection the new rows are zero."""
    _need_attention(config, "v_head_dim")
    _, v = _head_dims(config)
    _check_larger(config, "v_head_dim", v_head_dim, v)
    new = _replace(config, v_head_dim=v_head_dim)
    return _apply(config, params, new, "v",
                  {"heads": config.num_heads, "old": v, "new": v_head_dim}, seed)


def expand_ssm_state(config, params, ssm_state: int, *, seed: int = 0):
    """S4D state size N → N̂ (BiGS): new modes' A from the init, their C zero, so the kernel
    Re Σ_n C_n ... is unchanged."""
    arch = _arch(config)
    if not arch.ssm:
        raise GrowthError(f"ssm_state: this {arch.family} model has no SSM; "
                          "only BiGS-style encoders (mixer='ssm') have a state size")
    _check_larger(config, "ssm_state", ssm_state, config.ssm_state)
    new = dataclasses.replace(config, ssm_state=ssm_state)
    return _apply(config, params, new, "ssm", {}, seed)


def expand_hidden(config, params, hidden_size: int, *, mode: Optional[str] = None,
                  seed: int = 0):
    """Residual width h → ĥ (Thm 3.5, with the LayerNorm handling of the module docstring).

    `mode` is "zero" (RMSNorm), "mean" (pre-LN without an embedding norm) or "duplicate"
    (ĥ a multiple of h); None picks the model's default exact method.
    """
    arch = _arch(config)
    h = config.hidden_size
    _check_larger(config, "hidden_size", hidden_size, h)
    mode = mode or arch.hidden_modes[0]
    if mode not in arch.hidden_modes:
        raise GrowthError(f"hidden mode {mode!r} is not exact for this {arch.family} model; "
                          f"choose one of {arch.hidden_modes}")
    if mode == "duplicate" and hidden_size % h:
        why = ("its block-diagonal MLP writes each channel from one block only" if
               arch.family == "m2_vit" else "its residual stream starts at a LayerNorm output")
        raise GrowthError(
            f"hidden_size {hidden_size} is not a multiple of {h}: this {arch.family} model "
            f"grows its width exactly only by duplication ({why}); pick a multiple of {h}")
    if arch.family in growth_m2.FAMILIES:
        return growth_m2.expand_hidden(config, params, hidden_size, seed=seed)
    eps = config.norm_eps if mode == "duplicate" else config.norm_eps * h / hidden_size
    new = _replace(config, hidden_size=hidden_size,
                              norm_eps=eps)
    return _apply(config, params, new, "hidden", {"old": h, "new": hidden_size, "mode": mode},
                  seed)


# Leaves of a new layer that must be zero for it to start as the identity (Thm 3.6).
_BRANCH_OUT = r"^(mixer/out|attention/out|mlp/down|do|mlp/wo)/(kernel|bias)$"


def add_layers(config, params, num_layers: int, *, positions: Optional[list[int]] = None,
               seed: int = 0):
    """Depth N → N̂ (Thm 3.6): new layers at `positions` (indices in the grown model, default
    the top), random except zero output projections; post-LN models move the preceding
    LayerNorm's affine into the new layer (module docstring)."""
    arch = _arch(config)
    N = config.num_layers
    _check_larger(config, "num_layers", num_layers, N)
    if arch.family in growth_m2.FAMILIES:
        return growth_m2.add_layers(config, params, num_layers, positions=positions, seed=seed)
    positions = _layer_positions(N, num_layers, positions)
    new_config = dataclasses.replace(config, num_layers=num_layers)
    if rules._CONFIG_MODE:
        return new_config, params
    fresh, fresh_keys = _fresh(new_config, seed)
    flat = _flat(params)
    out, old_of = _reindex_layers(flat, num_layers, positions)
    for i in positions:
        for path, f in fresh.items():
            m = re.match(rf"^layers/{i}/(.*)$", path)
            if m:
                out[path] = np.zeros_like(f) if re.search(_BRANCH_OUT, m.group(1)) else f
        if arch.post_norm:
            _move_norm(out, i, arch)
    missing = set(fresh) ^ set(out)
    if missing:
        raise RuntimeError(f"growth: parameter sets differ after adding layers: {sorted(missing)}")
    out = {k: out[k].astype(flat[_old_path(k, old_of)].dtype) if _old_path(k, old_of) in flat
           else out[k] for k in out}
    return new_config, _to_jax(_unflat(out, fresh_keys))


def _old_path(path, old_of):
    m = re.match(r"^layers/(\d+)/(.*)$", path)
    if m is None:
        return path
    i = int(m.group(1))
    return f"layers/{old_of.index(i)}/{m.group(2)}" if i in old_of else path


def _move_norm(out: dict, i: int, arch: _Arch) -> None:
    """Post-LN: the norm producing layer i's input hands its (γ, β) to new layer i's last norm
    and becomes (1, 0); the new layer's other norms are (1, 0)."""
    prev = "embeddings/norm" if i == 0 else (
        f"layers/{i - 1}/norm" if arch.gated else f"layers/{i - 1}/mlp_norm")
    last = f"layers/{i}/norm" if arch.gated else f"layers/{i}/mlp_norm"
    for leaf, unit in (("scale", 1.0), ("bias", 0.0)):
        out[f"{last}/{leaf}"] = out[f"{prev}/{leaf}"].copy()
        unit = 0 if rules._INDEX_MODE else unit  # reset entries are new ones
        out[f"{prev}/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)
        if not arch.gated:
            out[f"layers/{i}/mixer_norm/{leaf}"] = np.full_like(out[f"{prev}/{leaf}"], unit)


_EXPANSIONS = {
    "intermediate_size": expand_mlp,
    "mlp_nblocks": merge_mlp_blocks,
    "num_heads": add_heads,
    "qk_head_dim": expand_keys,
    "v_head_dim": expand_values,
    "ssm_state": expand_ssm_state,
    "hidden_size": expand_hidden,
    "num_layers": add_layers,
}


def grow_params(config, params, *, seed: int = 0, hidden_mode: Optional[str] = None,
                layer_positions: Optional[list[int]] = None, **sizes: Any):
    """Apply every requested expansion (`SIZE_FIELDS` as keywords) in `SIZE_FIELDS` order.

    Returns the grown (config, params). Unchanged sizes are skipped; an unknown or impossible
    size raises GrowthError.
    """
    unknown = sorted(set(sizes) - set(SIZE_FIELDS))
    if unknown:
        raise GrowthError(f"unknown growth size(s) {unknown}; choose from {list(SIZE_FIELDS)}")
    if not (rules._INDEX_MODE or rules._CONFIG_MODE):
        final = grow_config(config, hidden_mode=hidden_mode, layer_positions=layer_positions,
                            **sizes)
        rules._FRESH_SOURCE["flat"] = _fresh(final, seed)[0]
    try:
        return _grow_each(config, params, seed, hidden_mode, layer_positions, sizes)
    finally:
        rules._FRESH_SOURCE.clear()


def _grow_each(config, params, seed, hidden_mode, layer_positions, sizes):
    for j, field in enumerate(SIZE_FIELDS):
        new = sizes.get(field)
        if new is None:
            continue
        current = {"intermediate_size": getattr(config, "mlp_size", None)
                   or getattr(config, "intermediate_size", None),
                   "qk_head_dim": _head_dims(config)[0] if hasattr(config, "qk_head_dim")
                   else None,
                   "v_head_dim": _head_dims(config)[1] if hasattr(config, "v_head_dim")
                   else None}.get(field, getattr(config, field, None))
        if current == new:
            continue
        kw = {"seed": seed + 1000 * j}
        if field == "hidden_size":
            kw["mode"] = hidden_mode
        if field == "num_layers":
            kw["positions"] = layer_positions
        config, params = _EXPANSIONS[field](config, params, int(new), **kw)
    return config, params


def index_maps(config, params, **grow_kwargs) -> tuple[Any, dict, list]:
    """Where every old parameter entry lands in the model `grow_params(config, params,
    **grow_kwargs)` builds.

    Returns (grown config, {grown path: int64 array of the grown leaf's shape holding 1 + the
    entry's position in the concatenation of the old leaves' flattened values, 0 for a new
    entry}, [old paths in concatenation order]). Entries whose value growth changes (rescaled
    keys and norm scales, split reader rows) still count as old: they are reparametrizations
    of the same weights.
    """
    flat = _flat_np(params)
    order = sorted(flat)
    total, tagged = 0, {}
    for path in order:
        size = int(np.prod(np.shape(flat[path])))
        tagged[path] = (np.arange(size, dtype=np.int64) + total + 1).reshape(np.shape(flat[path]))
        total += size
    keys = _keys(params)
    with _index_mode():
        new_config, grown = grow_params(config, _unflat(tagged, keys), **grow_kwargs)
    return new_config, _flat_np(grown), order


def grow_config(config, **grow_kwargs):
    """The config `grow_params(config, params, **grow_kwargs)` returns, without params."""
    rules._CONFIG_MODE = True
    try:
        return grow_params(config, None, **grow_kwargs)[0]
    finally:
        rules._CONFIG_MODE = False
