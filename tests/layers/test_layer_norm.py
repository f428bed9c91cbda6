"""Our LayerNorm (two-pass statistics, closed-form backward) against float64 and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bigs_jax.layers.linear import layer_norm


def _reference(x, scale, bias, eps):
    """float64 two-pass LayerNorm, differentiable by autodiff."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    scale, bias = (jnp.broadcast_to(p, x.shape) for p in (scale, bias))
    return (x - mu) / jnp.sqrt(var + eps) * scale + bias


# fp32 rounding of the mean is relative to |mean|, so the bound grows with mean / std.
@pytest.mark.parametrize("shape,offset,tol", [((3, 5, 16), 0.0, 2e-6), ((4, 64), 1000.0, 1e-4),
                                              ((2, 1), 0.0, 2e-6)])
def test_forward_and_gradients_match_float64_autodiff(shape, offset, tol):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 3 + offset
    scale = rng.normal(size=shape[-1:])
    bias = rng.normal(size=shape[-1:])
    dy = rng.normal(size=shape)
    norm = layer_norm(shape[-1], eps=1e-5, rngs=None)
    graphdef, _ = nnx.split(norm)

    def ours(x, s, b):
        return nnx.merge(graphdef, {"scale": s, "bias": b})(x)

    x32, s32, b32 = (jnp.asarray(a, jnp.float32) for a in (x, scale, bias))
    y = ours(x32, s32, b32)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * dy), argnums=(0, 1, 2))(x32, s32, b32)
    with jax.enable_x64():
        x64, s64, b64 = (jnp.asarray(np.float32(a), jnp.float64) for a in (x, scale, bias))
        want = _reference(x64, s64, b64, 1e-5)
        want_grads = jax.grad(lambda *a: jnp.sum(_reference(*a, 1e-5) * dy),
                              argnums=(0, 1, 2))(x64, s64, b64)
        for name, got, ref in zip(("y", "dx", "dscale", "dbias"), (y, *grads),
                                  (want, *want_grads)):
            ref = np.asarray(ref)
            err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / max(
                np.max(np.abs(ref)), 1e-30)
            assert err < tol, (name, err)


def test_as_accurate_as_torch_where_one_pass_variance_is_not():
    # A large mean: E[x^2] - E[x]^2 cancels catastrophically in fp32, the two-pass form not.
    rng = np.random.default_rng(1)
    x = np.float32(rng.normal(size=(8, 768)) * 0.05 + 300.0)
    x64 = x.astype(np.float64)
    mu64 = x64.mean(-1, keepdims=True)
    truth = (x64 - mu64) / np.sqrt(((x64 - mu64) ** 2).mean(-1, keepdims=True) + 1e-12)
    ours = np.asarray(layer_norm(768, eps=1e-12, rngs=None)(jnp.asarray(x)))
    theirs = torch.nn.functional.layer_norm(torch.from_numpy(x), (768,), eps=1e-12).numpy()
    mu = x.mean(-1, keepdims=True)
    one_pass = (x - mu) / np.sqrt(np.maximum((x * x).mean(-1, keepdims=True) - mu * mu, 0)
                                  + np.float32(1e-12))
    err = {name: np.max(np.abs(y - truth)) for name, y in
           (("ours", ours), ("torch", theirs), ("one_pass", one_pass))}
    assert err["ours"] < 2 * err["torch"] + 1e-4, err
    assert err["one_pass"] > 10 * err["ours"], err


def test_output_dtype_and_fp32_statistics():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32)), jnp.bfloat16)
    norm = layer_norm(32, eps=1e-6, rngs=None, dtype=jnp.bfloat16)
    assert norm(x).dtype == jnp.bfloat16
    assert layer_norm(32, eps=1e-6, rngs=None)(x).dtype == jnp.float32
    want = _reference(x.astype(jnp.float32), 1.0, 0.0, 1e-6)
    np.testing.assert_allclose(np.float32(norm(x)), np.float32(want.astype(jnp.bfloat16)), atol=2e-2)
