"""Matmul precision levels of the long-convolution matmul paths, the same on every backend.

The matmul paths of the long convolutions (S4D's chunked mode, `bigs_jax.layers.ssm`; M2's
Monarch-factored DFT and Toeplitz modes, `bigs_jax.layers.monarch` and `longconv`) take one
of `PRECISIONS` for their float32 contractions:

  'fp32'     one einsum at `Precision.HIGHEST` (no TF32 on GPU, six bf16 passes on TPU);
  'bf16_3x'  each operand split into bf16 hi = bf16(x) and lo = bf16(x - hi), three bf16
             products hi·hi + hi·lo + lo·hi with float32 accumulation (lo's rounding and the
             dropped lo·lo are ~2^-17 of the product); the backward pass likewise;
  'bf16'     one bf16 product hi·hi, float32 accumulation (each operand rounded by ~2^-9).

Written out as bf16 casts and `preferred_element_type=float32` rather than through
`jax.lax.Precision`, whose DEFAULT/HIGH mean different things on CPU, GPU and TPU. A complex
contraction (the DFT GEMMs) runs at 'fp32' as one complex64 einsum and otherwise as four real
ones, (a_re b_re - a_im b_im) + i (a_re b_im + a_im b_re), each split as above: bf16 products
exist only for real numbers. Measured errors: the docstrings of `ssm` and `longconv`.
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
    """Real float32 einsum at a `PRECISIONS` level; float32 result.

    At 'bf16_3x' the backward pass runs its two contractions at bf16_3x too (`_dot_3x`'s VJP):
    left to autodiff, the transpose of a product of bf16 operands returns bf16 cotangents, and
    the gradients would be bf16-accurate (~3e-3 through a Monarch long conv or S4D's chunked
    path). At 'bf16' autodiff's bf16 backward is the level asked for.
    """
    if precision == "fp32":
        return jnp.einsum(subscripts, a, b, precision="highest")
    check_precision(precision)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if precision == "bf16":
        return jnp.einsum(subscripts, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    return _dot_3x(subscripts, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dot_3x(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    dot_ = functools.partial(jnp.einsum, subscripts, preferred_element_type=jnp.float32)
    (a_hi, a_lo), (b_hi, b_lo) = _split(a), _split(b)
    return dot_(a_hi, b_lo) + dot_(a_lo, b_hi) + dot_(a_hi, b_hi)


def _dot_3x_fwd(subscripts, a, b):
    return _dot_3x(subscripts, a, b), (a, b)


def _dot_3x_bwd(subscripts, res, ct):
    # y = einsum("A,B->Y", a, b): da = einsum("Y,B->A", ct, b), db = einsum("A,Y->B", a, ct)
    # (every index of A is in B or Y, and of B in A or Y, in each contraction used here).
    a, b = res
    inputs, out = subscripts.replace(" ", "").split("->")
    in_a, in_b = inputs.split(",")
    return (_dot_3x(f"{out},{in_b}->{in_a}", ct, b), _dot_3x(f"{in_a},{out}->{in_b}", a, ct))


_dot_3x.defvjp(_dot_3x_fwd, _dot_3x_bwd)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bf16 (hi, lo) with hi + lo = x to ~2^-17 relative: hi = x rounded to bf16, lo the rest.

    hi is rounded by `reduce_precision`, not as x.astype(bf16).astype(f32): XLA may fold that
    round trip to x (`xla_allow_excess_precision`, on by default; reported for XLA:GPU in
    openxla/xla#41605), which would make lo = 0 and bf16_3x one bf16 product. On CPU the
    values are those of the round trip, bitwise.
    """
    x = jnp.asarray(x, jnp.float32)
    hi = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def complex_dot(subscripts: str, a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """complex64 einsum at a `PRECISIONS` level: as it is for 'fp32', else four real `dot`s."""
    if precision == "fp32":
        return jnp.einsum(subscripts, a, b, precision="highest")
    a_re, a_im, b_re, b_im = jnp.real(a), jnp.imag(a), jnp.real(b), jnp.imag(b)
    re = dot(subscripts, a_re, b_re, precision) - dot(subscripts, a_im, b_im, precision)
    im = dot(subscripts, a_re, b_im, precision) + dot(subscripts, a_im, b_re, precision)
    return jax.lax.complex(re, im)
