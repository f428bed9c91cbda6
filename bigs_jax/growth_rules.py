"""Per-parameter rules of function-preserving growth (see `bigs_jax.growth`).

The role of every axis of every parameter of the zoo's families, and how one leaf grows along
an axis for each expansion; `bigs_jax.growth` applies these to whole models. Also what
`bigs_jax.growth` and `bigs_jax.growth_m2` share: the flat parameter dicts, the fresh init of
a grown config, the re-indexing of old layers around new ones, and the module flags of the
index and config modes (set by `bigs_jax.growth`, read here and by both).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx, traverse_util

from bigs_jax.models import build, family_of

# Index mode (see `growth.index_maps`): the transforms run on arrays of old-element indices
# (1-based, 0 = new entry), with every value change (rescale, mean, split) left out, so the
# result says where each old entry went. The optimizer-state growth reads its moments through it.
_INDEX_MODE = False
# Config mode (see `growth.grow_config`): the transforms validate and return the grown config
# only.
_CONFIG_MODE = False
_FRESH_SOURCE: dict = {}  # {"flat": fresh params of the final config} during growth.grow_params
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class GrowthError(ValueError):
    """A requested expansion that this model cannot undergo (one line: what and why)."""


# ---------------------------------------------------------------------------- flat params


def _flat(params) -> dict:
    return {"/".join(str(k) for k in key): np.asarray(jax.device_get(v))
            for key, v in traverse_util.flatten_dict(params).items()}


def _flat_np(params) -> dict:
    return {"/".join(str(k) for k in key): v
            for key, v in traverse_util.flatten_dict(params).items()}


def _unflat(flat: dict, like_keys: dict) -> dict:
    return traverse_util.unflatten_dict({like_keys[k]: v for k, v in flat.items()})


def _keys(params) -> dict:
    return {"/".join(str(k) for k in key): key
            for key in traverse_util.flatten_dict(params)}


def _to_jax(tree):
    return tree if _INDEX_MODE else jax.tree.map(lambda x: jax.numpy.asarray(x), tree)


def _fresh(config, seed: int) -> tuple[dict, dict]:
    """Flat params of a randomly initialized `config` model, and their original keys."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(config, seed=seed))))
    if _INDEX_MODE:
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.int64), abstract)
        return {k: v for k, v in _flat_np(zeros).items()}, _keys(abstract)
    shapes = {k: v.shape for k, v in _flat_np(abstract).items()}
    source = _FRESH_SOURCE.get("flat")
    if source is not None and all(k in source and all(
            a <= b for a, b in zip(s, source[k].shape)) for k, s in shapes.items()):
        # A crop of the final grown model's init: the same family init, one compile per
        # grow_params call instead of one per expansion.
        return ({k: source[k][tuple(slice(0, a) for a in s)] for k, s in shapes.items()},
                _keys(abstract))
    # One compiled init instead of an eager one (which compiles every initializer per shape),
    # compiled without optimizations: it runs once, and that halves the compile time.
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(config, seed=seed)))).lower(
    ).compile(_FAST_COMPILE)()
    return _flat(params), _keys(params)


# ---------------------------------------------------------------------------- depth


def _layer_positions(n_old: int, n_new: int, positions) -> list[int]:
    """The grown model's indices of the new layers (default the top), checked."""
    positions = list(range(n_old, n_new)) if positions is None else sorted(positions)
    if len(positions) != n_new - n_old or len(set(positions)) != len(positions) or any(
            not 0 <= p < n_new for p in positions):
        raise GrowthError(f"positions {positions} must be {n_new - n_old} distinct layer "
                          f"indices in [0, {n_new})")
    return positions


def _reindex_layers(flat: dict, n_new: int, positions: list[int]) -> tuple[dict, list[int]]:
    """`flat` with old layer j renamed to its grown index `old_of[j]` (the new layers'
    `positions` left free), and `old_of`."""
    old_of = [i for i in range(n_new) if i not in positions]
    out = {}
    for path, w in flat.items():
        m = re.match(r"^layers/(\d+)/(.*)$", path)
        out[path if m is None else f"layers/{old_of[int(m.group(1))]}/{m.group(2)}"] = w
    return out, old_of


# ---------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class _Arch:
    family: str
    attention: bool      # has multi-head attention (heads, qk, v expansions)
    ssm: bool            # has S4D layers (ssm_state expansion)
    post_norm: bool      # residual sums are normalized (BERT): depth by LN moving
    hidden_modes: tuple  # exact hidden-size methods, the default first
    gated: bool = False  # BiGS layout (one norm, output projection `do`)


def _arch(config) -> _Arch:
    family = family_of(config).name
    if family == "encoder":
        modes = ("duplicate",)
        return _Arch(family, config.mixer == "attention", config.mixer == "ssm",
                     not config.uses_pre_norm, modes, gated=config.block == "gated")
    if family == "gpt2":
        return _Arch(family, True, False, False,
                     ("mean", "duplicate") if config.norm == "layer" else ("zero", "duplicate"))
    if family == "vit":
        return _Arch(family, True, False, False, ("mean", "duplicate"))
    if family == "m2":
        return _Arch(family, False, False, True, ("duplicate",))
    if family == "m2_vit":  # pre-LN, but block-diagonal MLPs: duplication only (growth_m2)
        return _Arch(family, False, False, False, ("duplicate",))
    raise GrowthError(f"growth is not implemented for the {family} family; "
                      "grow an encoder, gpt2, vit, m2 or m2_vit model")


def _head_dims(config) -> tuple[int, int]:
    k = config.qk_head_dim or config.hidden_size // config.num_heads
    v = config.v_head_dim or config.hidden_size // config.num_heads
    return k, v


def _pinned(config) -> dict:
    """Fields whose defaults derive from others, pinned to their current values, so that
    changing hidden_size or num_heads changes nothing else."""
    pins = {}
    if hasattr(config, "qk_head_dim"):
        pins["qk_head_dim"], pins["v_head_dim"] = _head_dims(config)
    if getattr(config, "intermediate_size", 0) is None:
        pins["intermediate_size"] = config.mlp_size
    return pins


def _replace(config, **changes):
    """config with `changes`, the derived fields pinned first (see `_pinned`)."""
    return dataclasses.replace(config, **{**_pinned(config), **changes})


# ---------------------------------------------------------------------------- parameter roles
# Role of each axis of a leaf: Dw writes the residual stream (or a hidden-sized internal
# representation), Dr reads it, Dn is a norm on it, Dt a norm feeding the tied decoder, Dc a
# per-channel parameter, D2r reads [forward, backward] concatenated; Fw/Fr write/read MLP
# units; Q/K/V are heads·dim columns, O the heads·V rows of the output projection; Nf/Nz the
# SSM state of A (free) and C (zero).


def _roles(arch: _Arch, config, path: str, ndim: int) -> tuple:
    r = _role_table(arch, config)
    for pattern, roles in r:
        if re.search(pattern, path):
            if len(roles) != ndim:
                break
            return roles
    raise RuntimeError(f"growth has no rule for parameter {path} (ndim {ndim}); "
                       "bigs_jax.growth must be updated for this model")


def _role_table(arch: _Arch, config) -> list:
    tied_final = arch.family == "gpt2" and config.tie_word_embeddings
    shared = getattr(config, "ssm_shared", True)
    s4 = r"(fs4|bs4)/"
    table = [
        (r"^embeddings/(word|position|token_type)/embedding$", (None, "Dw")),
        (r"^embeddings/norm/(scale|bias)$", ("Dn",)),
        (r"(mixer|attention)/query/kernel$", ("Dr", "Q")),
        (r"(mixer|attention)/query/bias$", ("Q",)),
        (r"(mixer|attention)/key/kernel$", ("Dr", "K")),
        (r"(mixer|attention)/key/bias$", ("K",)),
        (r"(mixer|attention)/value/kernel$", ("Dr", "V")),
        (r"(mixer|attention)/value/bias$", ("V",)),
        (r"mixer/out/kernel$", ("D2r", "Dw") if arch.ssm else ("O", "Dw")),
        (r"attention/out/kernel$", ("O", "Dw")),
        (r"(mixer|attention)/out/bias$", ("Dw",)),
        (r"mlp/up/kernel$", ("Dr", "Fw")),
        (r"mlp/up/bias$", ("Fw",)),
        (r"mlp/down/kernel$", ("Fr", "Dw")),
        (r"mlp/down/bias$", ("Dw",)),
        (r"/(dv|dol)/kernel$", ("Dr", "Fw")),
        (r"/(dv|dol)/bias$", ("Fw",)),
        (r"/do/kernel$", ("Fr", "Dw")),
        (r"/do/bias$", ("Dw",)),
        (r"/(du_forward|du_backward|duc_forward|duc_backward)/kernel$", ("Dr", "Dw")),
        (r"/(du_forward|du_backward|duc_forward|duc_backward)/bias$", ("Dw",)),
        (s4 + r"(A_re|A_im)$", ("Nf",) if shared else ("Dc", "Nf")),
        (s4 + r"C$", ("Nz", None) if shared else ("Dc", "Nz", None)),
        (s4 + r"(D|log_step)$", (None,) if shared else ("Dc",)),
        (r"^layers/\d+/(mixer_norm|mlp_norm|norm)/(scale|bias)$", ("Dn",)),
        (r"^final_norm/(scale|bias)$", ("Dt",) if tied_final else ("Dn",)),
        (r"^lm_head/kernel$", ("Dr", None)),
        (r"^mlm_head/transform/kernel$", ("Dr", "Dw")),
        (r"^mlm_head/transform/bias$", ("Dw",)),
        (r"^mlm_head/norm/(scale|bias)$", ("Dt",)),
        (r"^mlm_head/bias$", (None,)),
        (r"^classifier/pooler/kernel$", ("Dr", "Dw")),
        (r"^classifier/pooler/bias$", ("Dw",)),
        (r"^classifier/classifier/kernel$", ("Dr", None)),
        (r"^classifier/classifier/bias$", (None,)),
        (r"^patch_embed/kernel$", (None, None, None, "Dw")),
        (r"^(patch_embed/bias|cls)$", ("Dw",)),
        (r"^position$", (None, "Dw")),
        (r"^head/kernel$", ("Dr", None)),
        (r"^head/bias$", (None,)),
    ]
    return table


def _crop(f: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """f cropped to w's shape on every axis but `axis`."""
    return f[tuple(slice(None) if a == axis else slice(0, w.shape[a]) for a in range(w.ndim))]


def _cat(*parts, axis):
    return np.concatenate(parts, axis=axis)


def _zeros_like_block(w, axis, n):
    shape = list(w.shape)
    shape[axis] = n
    return np.zeros(shape, w.dtype)


def _take(x, axis, start, stop):
    return np.take(x, np.arange(start, stop), axis=axis)


def _per_head(w, f, axis, heads, old, new, fill):
    """Grow each head's block of `old` entries along `axis` to `new` ('fresh' or 'zero')."""
    shape = list(w.shape)
    w_h = w.reshape(shape[:axis] + [heads, old] + shape[axis + 1:])
    if fill == "zero":
        extra = _zeros_like_block(w_h, axis + 1, new - old)
    else:
        fs = list(f.shape)
        f_h = f.reshape(fs[:axis] + [heads, new] + fs[axis + 1:])
        extra = _take(f_h, axis + 1, old, new).astype(w.dtype)
    out = _cat(w_h, extra, axis=axis + 1)
    return out.reshape(shape[:axis] + [heads * new] + shape[axis + 1:])


def _split_rows(w, f, axis, m):
    """Rows of a reader of an m-times tiled input: m random parts summing to w."""
    h = w.shape[axis]
    parts = [_take(f, axis, h * j, h * (j + 1)).astype(w.dtype) for j in range(1, m)]
    first = w - sum(parts) if parts else w
    return _cat(first, *parts, axis=axis)


# ---------------------------------------------------------------------------- one transform


def _grow_leaf(path, w, f, roles, kind, ctx):
    """Grow every axis of `w` whose role belongs to expansion `kind`."""
    name = path.rsplit("/", 1)[-1]
    for axis, role in enumerate(roles):
        if role is None or w.shape[axis] == f.shape[axis] and kind != "hidden":
            continue
        fc = _crop(f, w, axis)
        n_old, n_new = w.shape[axis], f.shape[axis]
        if kind == "mlp" and role in ("Fw", "Fr"):
            w = _cat(w, _take(fc, axis, n_old, n_new).astype(w.dtype) if role == "Fw"
                     else _zeros_like_block(w, axis, n_new - n_old), axis=axis)
        elif kind == "ssm" and role in ("Nf", "Nz"):
            w = _cat(w, _take(fc, axis, n_old, n_new).astype(w.dtype) if role == "Nf"
                     else _zeros_like_block(w, axis, n_new - n_old), axis=axis)
        elif kind == "heads" and role in ("Q", "K", "V", "O"):
            w = _cat(w, _zeros_like_block(w, axis, n_new - n_old) if role == "O"
                     else _take(fc, axis, n_old, n_new).astype(w.dtype), axis=axis)
        elif kind == "qk" and role in ("Q", "K"):
            E, k_old, k_new = ctx["heads"], ctx["old"], ctx["new"]
            if role == "K" and not _INDEX_MODE:  # key scaled by √(k̂/k) so q·k/√k̂ keeps its value (Thm 3.4)
                w = (w.astype(np.float64) * math.sqrt(k_new / k_old)).astype(w.dtype)
            w = _per_head(w, fc, axis, E, k_old, k_new, "fresh" if role == "Q" else "zero")
        elif kind == "v" and role in ("V", "O"):
            w = _per_head(w, fc, axis, ctx["heads"], ctx["old"], ctx["new"],
                          "fresh" if role == "V" else "zero")
        elif kind == "hidden" and role is not None and role.startswith("D"):
            w = _grow_hidden_axis(w, fc, axis, role, name, ctx)
    return w


def _grow_hidden_axis(w, f, axis, role, name, ctx):
    h, h_new, mode = ctx["old"], ctx["new"], ctx["mode"]
    if role == "D2r":  # [forward | backward] halves, each a reader of the grown width
        halves = [_take(w, axis, 0, h), _take(w, axis, h, 2 * h)]
        fresh = [_take(f, axis, 0, h_new), _take(f, axis, h_new, 2 * h_new)]
        return _cat(*(_grow_hidden_axis(a, b, axis, "Dr", name, ctx)
                      for a, b in zip(halves, fresh)), axis=axis)
    n = h_new - h
    if mode == "duplicate":
        m = h_new // h
        if role == "Dr":
            return _split_rows(w, f, axis, m)
        if _INDEX_MODE:  # the copies are new entries
            return _cat(w, _zeros_like_block(w, axis, n), axis=axis)
        tiled = np.concatenate([w] * m, axis=axis)
        return (tiled / m).astype(w.dtype) if role == "Dt" else tiled
    if role == "Dr":
        return _cat(w, _take(f, axis, h, h_new).astype(w.dtype), axis=axis)
    if role == "Dw":
        if mode == "zero" or _INDEX_MODE:
            return _cat(w, _zeros_like_block(w, axis, n), axis=axis)
        mean = w.astype(np.float64).mean(axis=axis, keepdims=True)
        return _cat(w, np.repeat(mean, n, axis=axis).astype(w.dtype), axis=axis)
    if role in ("Dn", "Dt"):
        if name == "bias":
            return _cat(w, _zeros_like_block(w, axis, n), axis=axis)
        scaled = w if _INDEX_MODE else (
            w.astype(np.float64) * math.sqrt(h / h_new)).astype(w.dtype)
        return _cat(scaled, _take(f, axis, h, h_new).astype(w.dtype), axis=axis)
    raise GrowthError(f"hidden mode {mode!r} cannot grow a per-channel parameter; "
                      "use mode='duplicate'")

