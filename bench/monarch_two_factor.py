"""Two-factor Monarch matrices, M = P₂ L P₁ R, and a linear layer built on them.

No model uses them (M2-BERT's MLP is one block-diagonal factor, `layers.monarch.BlockdiagLinear`),
so they live here: bench/monarch.py times them against dense and block-diagonal projections, and
tests/layers/test_monarch.py checks them against dense matrices. The layout follows the
`blockdiag_butterfly_multiply` convention of the official M2 / fly code.

Dimension key:
  T: flattened leading batch dims
  K, P, Q: blocks of the first factor, input and output size of each block (I = K·P)
  J, R, S: the same for the second factor (J·R = K·Q, O = J·S)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigs_jax.layers.linear import leading_ones
from bigs_jax.layers.monarch import (
    _fit_features,
    _param,
    _uniform,
    blockdiag_matmul,
    blockdiag_to_dense,
)

Array = jax.Array
Dtype = Any
PrecisionLike = Any


def _check_monarch(r_KPQ: Array, l_JRS: Array) -> None:
    K, _, Q = r_KPQ.shape
    J, R, _ = l_JRS.shape
    if K * Q != J * R:
        raise ValueError(f"monarch: the first factor outputs K*Q = {K}*{Q} = {K * Q} features "
                         f"but the second takes J*R = {J}*{R} = {J * R}; they must be equal.")


def monarch_matmul(x: Array, r_KPQ: Array, l_JRS: Array, *,
                   precision: PrecisionLike = None) -> Array:
    """y = x @ Mᵀ for the Monarch matrix M = P₂ L P₁ R (fly/M2 `blockdiag_butterfly_multiply`).

    Steps, on the feature axis of `x` (features in row-major block order):
      1. R: `blockdiag_matmul(x, r_KPQ)` gives K·Q features.
      2. P₁: view them as (R, J) (R major), transpose to (J, R) and flatten.
      3. L: `blockdiag_matmul(., l_JRS)` gives J blocks of S, laid out (J, S).
      4. P₂: transpose (J, S) to (S, J) and flatten: output feature s·J + j.
    For square blocks (K = J = P = Q = R = S = b, n = b²) P₁ = P₂ = P is the reshape-transpose
    permutation (P = Pᵀ) and M = P L Pᵀ R, the order-2 Monarch matrix of the papers. Weights of
    the official code (`w1_bfly` (K, Q, P), `w2_bfly` (J, S, R), torch (out, in) blocks) load as
    `r_KPQ = w1_bfly.transpose(0, 2, 1)`, `l_JRS = w2_bfly.transpose(0, 2, 1)`.

    Args:
      x: (..., K·P) input.
      r_KPQ: (K, P, Q) first (right-most) block-diagonal factor.
      l_JRS: (J, R, S) second block-diagonal factor, with J·R = K·Q.
      precision: `jax.lax.Precision` of the matmuls.

    Returns:
      (..., S·J) output.
    """
    _check_monarch(r_KPQ, l_JRS)
    J, R, S = l_JRS.shape
    lead = x.shape[:-1]
    y = blockdiag_matmul(x, r_KPQ, precision=precision)
    y = jnp.swapaxes(y.reshape(*lead, R, J), -1, -2).reshape(*lead, J * R)
    z = blockdiag_matmul(y, l_JRS, precision=precision)
    return jnp.swapaxes(z.reshape(*lead, J, S), -1, -2).reshape(*lead, S * J)


def monarch_to_dense(r_KPQ: Array, l_JRS: Array) -> Array:
    """Dense (K·P, S·J) W with `monarch_matmul(x, r, l) == x @ W`, built from explicit
    permutation indices rather than reshapes (tests, benchmarks)."""
    _check_monarch(r_KPQ, l_JRS)
    J, R, S = l_JRS.shape
    # Column c of a permuted matrix takes column src[c] of the unpermuted one.
    src_p1 = np.arange(J * R).reshape(R, J).T.reshape(-1)
    src_p2 = np.arange(J * S).reshape(J, S).T.reshape(-1)
    w_IO = blockdiag_to_dense(r_KPQ)[:, src_p1] @ blockdiag_to_dense(l_JRS)
    return w_IO[:, src_p2]


class MonarchLinear(nnx.Module):
    """Linear layer whose kernel is a two-factor Monarch matrix (see `monarch_matmul`).

    Shapes follow fly's `MonarchLinear` (both factors have `nblocks` blocks): with
    P = ⌈in/nblocks⌉ and Q = ⌈out/nblocks⌉, `kernel1` is (nblocks, P, P) and `kernel2`
    (nblocks, P, Q) when in < out, else (nblocks, P, Q) and (nblocks, Q, Q). Features are
    zero-padded/cropped like `BlockdiagLinear`. Torch keys `blkdiag1`, `blkdiag2` (block, out, in)
    load as `kernel1`/`kernel2` = `blkdiagN.transpose(0, 2, 1)`; `bias` as-is. Float32, with a
    bias, sharded ("embed", "mlp") like the M2 MLP's up-projection.
    """

    def __init__(self, in_features: int, out_features: int, *, nblocks: int = 4,
                 rngs: nnx.Rngs):
        P = math.ceil(in_features / nblocks)
        Q = math.ceil(out_features / nblocks)
        self.out_features = out_features
        mid = min(P, Q)  # the middle size: fly keeps the smaller of the two block sizes
        # fly init: U(±1/√fan_in) per factor with fan_in = its block input size.
        self.kernel1 = _param(
            _uniform(rngs.params(), (nblocks, P, mid), 1 / math.sqrt(P), jnp.float32),
            (None, "embed", None))
        self.kernel2 = _param(
            _uniform(rngs.params(), (nblocks, mid, Q), 1 / math.sqrt(mid), jnp.float32),
            (None, None, "mlp"))
        self.bias = _param(_uniform(rngs.params(), (out_features,), 1 / math.sqrt(out_features),
                                    jnp.float32), ("mlp",))

    def __call__(self, x: Array) -> Array:
        """Applies the layer to x of shape (..., in_features); returns (..., out_features)."""
        K, P, _ = self.kernel1.shape
        y = monarch_matmul(_fit_features(x, K * P), self.kernel1[...], self.kernel2[...])
        y = _fit_features(y, self.out_features)
        return y + leading_ones(self.bias[...], y.ndim)
