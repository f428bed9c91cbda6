"""Blocked online-softmax attention in plain JAX, with a backward pass that recomputes its blocks.

FlashAttention (Dao et al. 2022, arXiv 2205.14135; FlashAttention-2, arXiv 2307.08691) written
with XLA loops, so it runs on every backend; it is the CPU kernel of `attention.py` and the
fallback of the GPU/TPU kernels. Queries go in blocks of Tq and, for each query block, keys in
blocks of Tk: each (Tq, Tk) tile of scores updates a running row maximum m, a running sum l of
exp(s - m) and an unnormalized output, so no (L, S) matrix is ever held. The forward keeps only
the output and the row logsumexp m + log l; the backward (a `jax.custom_vjp`) recomputes every
tile's probabilities from them. Memory is linear in L and S; the work is that of plain
attention, minus the tiles a causal mask removes entirely (they are skipped).

Masks come as their structured pieces (key padding, segment ids, causal positions), turned into
one (Tq, Tk) tile of booleans at a time. Dropout on the probabilities draws each tile's mask
from the dropout key folded with the tile's (query block, key block) index, so the backward
regenerates exactly the forward's masks. Softmax statistics and accumulators are fp32 whatever
the compute dtype (float64 stays float64).

Dimension key: B batch, H heads, L query length, S key length, K q/k head dim, V v head dim,
N query blocks, M key blocks, T queries per block, U keys per block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Scores (floats) of one (T, U) tile over all batch rows and heads; see `block_sizes`.
TILE_FLOATS = 1 << 21
# Keys per block at most; see `block_sizes`.
KEY_BLOCK = 512


class Masks(NamedTuple):
    """The structured mask of one call, padded to whole blocks; every field optional.

    key_BS: True for real keys. seg_q_BL, seg_k_BS: segment ids (equal ids attend).
    pos_q_BL: query positions for `causal` (keys sit at 0..S-1): key s is seen by a query at
    position p when s <= p.
    """
    key_BS: Optional[jax.Array] = None
    seg_q_BL: Optional[jax.Array] = None
    seg_k_BS: Optional[jax.Array] = None
    pos_q_BL: Optional[jax.Array] = None


class Static(NamedTuple):
    """The hashable settings of one call (custom_vjp's non-differentiable arguments)."""
    causal: bool
    rate: float
    broadcast: bool
    T: int
    U: int


def block_sizes(B: int, H: int, L: int, S: int) -> tuple[int, int]:
    """(T, U): keys in blocks of at most KEY_BLOCK, then queries in blocks of at most the
    largest power of two whose B·H·T·U scores fit in TILE_FLOATS; each axis split into equal
    blocks (multiples of 8 where the blocks are larger) so padding the last block wastes
    little. An axis that fits is one block.

    The power of two: XLA:CPU runs (256, 512) tiles 12-14% faster than the (296, 512) and
    (320, 512) that the budget alone gives a 12-head row at 2K and 4K tokens (bench/attention.py).
    """
    U = _even_split(S, KEY_BLOCK)
    most = max(1, TILE_FLOATS // (B * H * U))
    return _even_split(L, 1 << (most.bit_length() - 1)), U


def _even_split(n: int, most: int) -> int:
    """The size of the fewest equal blocks of at most `most` covering n, rounded up to a
    multiple of 8 when over 8 (and below `most`)."""
    if n <= most:
        return n
    size = -(-n // -(-n // most))
    return min(most, -(-size // 8) * 8) if size > 8 else size


def flash_attention(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array,
                    masks: Masks = Masks(), *, causal: bool = False, dropout_rate: float = 0.0,
                    dropout_key: Optional[jax.Array] = None, broadcast_dropout: bool = False,
                    blocks: Optional[tuple[int, int]] = None) -> jax.Array:
    """softmax(q kᵀ / sqrt(K)) v (B, L, H, V), masked and with dropout on the probabilities.

    Args:
      q_BLHK, k_BSHK, v_BSHV: queries, keys, values (q/k and v head dims may differ).
      masks: unpadded `Masks` (key_BS (B|1, S), seg_q_BL (B, L), seg_k_BS (B, S),
        pos_q_BL (B|1, L)); pos_q_BL defaults to 0..L-1 when causal.
      causal: a query at position p sees the keys at positions <= p.
      dropout_rate: probability of zeroing each attention probability (the rest scaled by
        1 / (1 - rate)); needs `dropout_key`.
      broadcast_dropout: one (L, S) dropout mask shared by every example and head.
      blocks: (T, U) queries and keys per block; `block_sizes` when None.
    """
    B, L, H, _ = q_BLHK.shape
    S = k_BSHK.shape[1]
    if dropout_rate > 0 and dropout_key is None:
        raise ValueError("attention dropout needs a key: pass rngs with a 'dropout' stream "
                         "or call with deterministic=True")
    T, U = blocks or block_sizes(B, H, L, S)
    Lp, Sp = -(-L // T) * T, -(-S // U) * U
    if causal and masks.pos_q_BL is None:
        masks = masks._replace(pos_q_BL=jnp.arange(L)[None, :])
    if Sp > S and masks.key_BS is None:
        masks = masks._replace(key_BS=jnp.ones((1, S), bool))
    pad = lambda x, n, value: None if x is None else jnp.pad(
        x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    masks = Masks(pad(masks.key_BS, Sp, False), pad(masks.seg_q_BL, Lp, 0),
                  pad(masks.seg_k_BS, Sp, 0), pad(masks.pos_q_BL, Lp, 0))
    heads_first = lambda x, n: jnp.swapaxes(pad(x, n, 0), 1, 2)  # (B, H, L, K)
    q, k, v = heads_first(q_BLHK, Lp), heads_first(k_BSHK, Sp), heads_first(v_BSHV, Sp)
    key = jax.random.key(0) if dropout_key is None else dropout_key
    static = Static(causal, float(dropout_rate), broadcast_dropout, T, U)
    o_BHLV = _flash(q, k, v, masks, key, static)
    return jnp.swapaxes(o_BHLV, 1, 2)[:, :L]


def _stats_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # float64 stays float64


def _tile_mask(masks: Masks, i, j, static: Static) -> Optional[jax.Array]:
    """(B|1, 1, T, U) booleans of tile (i, j) (True = may attend), None when nothing masks."""
    T, U = static.T, static.U
    q_rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * T, T, axis=1)
    k_cols = lambda x: jax.lax.dynamic_slice_in_dim(x, j * U, U, axis=1)
    parts = []
    if masks.key_BS is not None:
        parts.append(k_cols(masks.key_BS)[:, None, None, :])
    if masks.seg_q_BL is not None:
        parts.append(q_rows(masks.seg_q_BL)[:, None, :, None]
                     == k_cols(masks.seg_k_BS)[:, None, None, :])
    if static.causal:
        s_1U = (j * U + jnp.arange(U))[None, :]
        parts.append((s_1U[:, None, None, :] <= q_rows(masks.pos_q_BL)[:, None, :, None]))
    if not parts:
        return None
    return functools.reduce(jnp.logical_and, parts)


def _tile_needed(masks: Masks, i, j, static: Static) -> jax.Array:
    """False when the causal mask removes tile (i, j) entirely (its first key comes after
    every query's position)."""
    if not static.causal:
        return jnp.bool_(True)
    pos = jax.lax.dynamic_slice_in_dim(masks.pos_q_BL, i * static.T, static.T, axis=1)
    return j * static.U <= jnp.max(pos)


def _tile_scores(q_BHTK, k_BHUK, mask) -> jax.Array:
    """q kᵀ / sqrt(K) of one tile in the stats dtype, the dtype's minimum where masked (a
    row with every key masked then attends uniformly, as a dense softmax would)."""
    acc = _stats_dtype(q_BHTK.dtype)
    s_BHTU = jnp.einsum("BHTK,BHUK->BHTU", q_BHTK, k_BHUK, preferred_element_type=acc)
    s_BHTU = s_BHTU * (1.0 / jnp.sqrt(jnp.asarray(q_BHTK.shape[-1], acc)))
    if mask is not None:
        s_BHTU = jnp.where(mask, s_BHTU, jnp.finfo(acc).min)
    return s_BHTU


def _tile_keep(key, i, j, shape_BHTU, static: Static) -> jax.Array:
    """The dropout keep-mask of tile (i, j), scaled by 1 / (1 - rate)."""
    B, H, T, U = shape_BHTU
    tile_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
    shape = (1, 1, T, U) if static.broadcast else shape_BHTU
    keep = jax.random.bernoulli(tile_key, 1.0 - static.rate, shape)
    return keep / (1.0 - static.rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, masks, key, static):
    return _flash_fwd(q, k, v, masks, key, static)[0]


def _flash_fwd(q_BHLK, k_BHSK, v_BHSV, masks, key, static: Static):
    B, H, L, _ = q_BHLK.shape
    V, T, U = v_BHSV.shape[-1], static.T, static.U
    N, M = L // T, k_BHSK.shape[2] // U
    acc = _stats_dtype(q_BHLK.dtype)

    def query_block(i):
        q_BHTK = jax.lax.dynamic_slice_in_dim(q_BHLK, i * T, T, axis=2)

        def tile(j, carry):
            m_BHT, l_BHT, o_BHTV = carry
            k_BHUK = jax.lax.dynamic_slice_in_dim(k_BHSK, j * U, U, axis=2)
            v_BHUV = jax.lax.dynamic_slice_in_dim(v_BHSV, j * U, U, axis=2)
            s_BHTU = _tile_scores(q_BHTK, k_BHUK, _tile_mask(masks, i, j, static))
            m_new = jnp.maximum(m_BHT, jnp.max(s_BHTU, axis=-1))
            p_BHTU = jnp.exp(s_BHTU - m_new[..., None])
            scale_BHT = jnp.exp(m_BHT - m_new)
            l_BHT = l_BHT * scale_BHT + jnp.sum(p_BHTU, axis=-1)
            if static.rate > 0:
                p_BHTU = p_BHTU * _tile_keep(key, i, j, p_BHTU.shape, static)
            pv_BHTV = jnp.einsum("BHTU,BHUV->BHTV", p_BHTU.astype(v_BHUV.dtype), v_BHUV,
                                 preferred_element_type=acc)
            return m_new, l_BHT, o_BHTV * scale_BHT[..., None] + pv_BHTV

        def maybe_tile(j, carry):
            return jax.lax.cond(_tile_needed(masks, i, j, static), tile,
                                lambda j, c: c, j, carry)

        init = (jnp.full((B, H, T), jnp.finfo(acc).min, acc), jnp.zeros((B, H, T), acc),
                jnp.zeros((B, H, T, V), acc))
        m_BHT, l_BHT, o_BHTV = jax.lax.fori_loop(
            0, M, maybe_tile if static.causal else tile, init)
        return (o_BHTV / l_BHT[..., None]).astype(v_BHSV.dtype), m_BHT + jnp.log(l_BHT)

    o_NBHTV, lse_NBHT = jax.lax.map(query_block, jnp.arange(N))
    o_BHLV = jnp.moveaxis(o_NBHTV, 0, 2).reshape(B, H, L, V)
    lse_BHL = jnp.moveaxis(lse_NBHT, 0, 2).reshape(B, H, L)
    return o_BHLV, (q_BHLK, k_BHSK, v_BHSV, masks, key, o_BHLV, lse_BHL)


def _flash_bwd(static: Static, res, do_BHLV):
    q_BHLK, k_BHSK, v_BHSV, masks, key, o_BHLV, lse_BHL = res
    B, H, L, K = q_BHLK.shape
    V, T, U = v_BHSV.shape[-1], static.T, static.U
    N, M = L // T, k_BHSK.shape[2] // U
    acc = _stats_dtype(q_BHLK.dtype)
    scale = 1.0 / jnp.sqrt(jnp.asarray(K, acc))
    delta_BHL = jnp.sum(do_BHLV.astype(acc) * o_BHLV.astype(acc), axis=-1)
    rows = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * T, T, axis=2)

    def key_block(dq_BHLK, j):
        k_BHUK = jax.lax.dynamic_slice_in_dim(k_BHSK, j * U, U, axis=2)
        v_BHUV = jax.lax.dynamic_slice_in_dim(v_BHSV, j * U, U, axis=2)

        def tile(i, carry):
            dq_BHLK, dk_BHUK, dv_BHUV = carry
            q_BHTK, do_BHTV = rows(q_BHLK, i), rows(do_BHLV, i)
            mask = _tile_mask(masks, i, j, static)
            s_BHTU = _tile_scores(q_BHTK, k_BHUK, mask)
            p_BHTU = jnp.exp(s_BHTU - rows(lse_BHL, i)[..., None])
            dp_BHTU = jnp.einsum("BHTV,BHUV->BHTU", do_BHTV, v_BHUV,
                                 preferred_element_type=acc)
            pd_BHTU = p_BHTU
            if static.rate > 0:
                keep_BHTU = _tile_keep(key, i, j, p_BHTU.shape, static)
                pd_BHTU, dp_BHTU = p_BHTU * keep_BHTU, dp_BHTU * keep_BHTU
            dv_BHUV = dv_BHUV + jnp.einsum("BHTU,BHTV->BHUV", pd_BHTU.astype(do_BHTV.dtype),
                                           do_BHTV, preferred_element_type=acc)
            ds_BHTU = p_BHTU * (dp_BHTU - rows(delta_BHL, i)[..., None]) * scale
            if mask is not None:  # rows with every key masked would leak a gradient
                ds_BHTU = jnp.where(mask, ds_BHTU, 0)
            ds_BHTU = ds_BHTU.astype(q_BHTK.dtype)
            dq_BHTK = rows(dq_BHLK, i) + jnp.einsum("BHTU,BHUK->BHTK", ds_BHTU, k_BHUK,
                                                    preferred_element_type=acc)
            dq_BHLK = jax.lax.dynamic_update_slice_in_dim(dq_BHLK, dq_BHTK, i * T, axis=2)
            dk_BHUK = dk_BHUK + jnp.einsum("BHTU,BHTK->BHUK", ds_BHTU, q_BHTK,
                                           preferred_element_type=acc)
            return dq_BHLK, dk_BHUK, dv_BHUV

        def maybe_tile(i, carry):
            return jax.lax.cond(_tile_needed(masks, i, j, static), tile,
                                lambda i, c: c, i, carry)

        init = (dq_BHLK, jnp.zeros((B, H, U, K), acc), jnp.zeros((B, H, U, V), acc))
        dq_BHLK, dk_BHUK, dv_BHUV = jax.lax.fori_loop(
            0, N, maybe_tile if static.causal else tile, init)
        return dq_BHLK, (dk_BHUK, dv_BHUV)

    dq_BHLK, (dk_MBHUK, dv_MBHUV) = jax.lax.scan(
        key_block, jnp.zeros((B, H, L, K), acc), jnp.arange(M))
    dk_BHSK = jnp.moveaxis(dk_MBHUK, 0, 2).reshape(k_BHSK.shape)
    dv_BHSV = jnp.moveaxis(dv_MBHUV, 0, 2).reshape(v_BHSV.shape)
    return (dq_BHLK.astype(q_BHLK.dtype), dk_BHSK.astype(k_BHSK.dtype),
            dv_BHSV.astype(v_BHSV.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
