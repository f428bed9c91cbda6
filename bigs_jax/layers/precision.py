"""Matmul precision levels of the long-convolution matmul paths, the same on every backend.

The matmul paths of the long convolutions (S4D's chunked mode, `bigs_jax.layers.ssm`; M2's
Monarch-factored DFT and Toeplitz modes, `bigs_jax.layers.monarch` and `longconv`) take one
of `PRECISIONS` for their float32 contractions:

  'fp32'     one einsum at `Precision.HIGHEST` (no TF32 on GPU, six bf16 passes on TPU);
  'bf16_3x'  each operand split into bf16 hi = bf16(x) and lo = bf16(x - hi), three bf16
             products hi·hi + hi·lo + lo·hi with float32 accumulation (the dropped lo·lo is
             ~2^-16 of the product);
  'bf16'     one bf16 product hi·hi, float32 accumulation (each operand rounded by ~2^-9).

Written out as bf16 casts and `preferred_element_type=float32` rather than through
`jax.lax.Precision`, whose DEFAULT/HIGH mean different things on CPU, GPU and TPU. A complex
contraction (the DFT GEMMs) runs at 'fp32' as one complex64 einsum and otherwise as four real
ones, (a_re b_re - a_im b_im) + i (a_re b_im + a_im b_re), each split as above: bf16 products
exist only for real numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PRECISIONS = ("fp32", "bf16_3x", "bf16")


def check_precision(precision: str, what: str = "matmul precision") -> str:
    """`precision` if it is one of `PRECISIONS`, else a one-line ValueError naming `what`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown {what} {precision!r}; choose one of {list(PRECISIONS)}")
    return precision


def dot(subscripts: str, a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """Real float32 einsum at a `PRECISIONS` level; float32 result."""
    if precision == "fp32":
        return jnp.einsum(subscripts, a, b, precision="highest")
    check_precision(precision)
    dot_ = functools.partial(jnp.einsum, subscripts, preferred_element_type=jnp.float32)
    a_hi, b_hi = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    if precision == "bf16":
        return dot_(a_hi, b_hi)
    a_lo = (a - a_hi.astype(jnp.float32)).astype(jnp.bfloat16)
    b_lo = (b - b_hi.astype(jnp.float32)).astype(jnp.bfloat16)
    return dot_(a_hi, b_lo) + dot_(a_lo, b_hi) + dot_(a_hi, b_hi)


def complex_dot(subscripts: str, a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """complex64 einsum at a `PRECISIONS` level: as it is for 'fp32', else four real `dot`s."""
    if precision == "fp32":
        return jnp.einsum(subscripts, a, b, precision="highest")
    a_re, a_im, b_re, b_im = jnp.real(a), jnp.imag(a), jnp.real(b), jnp.imag(b)
    re = dot(subscripts, a_re, b_re, precision) - dot(subscripts, a_im, b_im, precision)
    im = dot(subscripts, a_re, b_im, precision) + dot(subscripts, a_im, b_re, precision)
    return jax.lax.complex(re, im)
