"""S4D layer: kernel vs float64 numpy, FFT = scan = recurrence = Toeplitz, causality, padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigs_jax.layers.ssm import S4D, resolve_mode, reverse_padded, s4d_kernel, ssm_init

LOG_STEPS = np.log([0.01, 0.03, 0.1, 0.3, 1.0])  # the BiGS init range, ends included


def ref_kernel(a_re_HN, a_im_HN, c_HN2, log_step_H, L):
    """The official formula in float64 numpy on the given (float32) values."""
    a_re, a_im, c, ls = (np.asarray(x, np.float64) for x in (a_re_HN, a_im_HN, c_HN2, log_step_H))
    A = np.minimum(a_re, -1e-4) + 1j * a_im
    dtA = np.exp(ls)[:, None] * A
    cb = (c[..., 0] + 1j * c[..., 1]) * (np.exp(dtA) - 1) / A
    return np.einsum("hn,hnl->hl", cb, np.exp(dtA[..., None] * np.arange(L))).real


def ref_conv(K_HL, D_H, u_BLD, anticausal=False):
    """Direct float64 (anti-)causal convolution y[t] = sum_s K[|t - s|] u[s] + D u[t]."""
    L = u_BLD.shape[1]
    lag = np.arange(L)[:, None] - np.arange(L)[None, :]
    lag = -lag if anticausal else lag
    T_HLL = np.where(lag >= 0, np.asarray(K_HL, np.float64)[:, np.clip(lag, 0, None)], 0)
    T_DLL = np.broadcast_to(T_HLL, (u_BLD.shape[-1], L, L))
    u = np.asarray(u_BLD, np.float64)
    return np.einsum("dts,bsd->btd", T_DLL, u) + np.asarray(D_H, np.float64) * u


def rel_err(x, ref):
    return np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max()


def make_ssm(D, N=64, shared=True, init="legs", seed=0, **kw):
    """An S4D with random D and log_step spread over the init range (not just the defaults)."""
    m = S4D(D, state_size=N, shared=shared, init=init, rngs=nnx.Rngs(seed), **kw)
    rng = np.random.default_rng(seed)
    m.D[...] = jnp.asarray(rng.normal(size=m.D.shape), jnp.float32)
    m.log_step[...] = jnp.asarray(rng.uniform(LOG_STEPS[0], 0, m.log_step.shape), jnp.float32)
    return m


def params_H(m):
    a_re, a_im, c = (np.asarray(p[...]) for p in (m.A_re, m.A_im, m.C))
    if m.shared:
        a_re, a_im, c = a_re[None], a_im[None], c[None]
    return a_re, a_im, c, np.asarray(m.log_step[...])


MODES = ("fft", "chunked", "scan", "recurrent", "toeplitz")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(graph, state, u, mask, modes):
    m = nnx.merge(graph, state)
    return [m(u, mask, mode=mode) for mode in modes]


def apply(m, u, mask=None, mode="fft"):
    return _apply(*nnx.split(m), u, mask, (mode,))[0]


def apply_all(m, u):
    """Every mode in one compiled function (compiling them together is cheaper)."""
    return dict(zip(MODES, _apply(*nnx.split(m), u, None, MODES)))


# ---- init -------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 16, 64])
def test_legs_eigenvalues_match_independent_construction(N):
    a_re, a_im = ssm_init("legs", N)
    # Independent: the normal part written in closed form, S = -I/2 + 1/2 sgn(k - n)
    # sqrt((2n+1)(2k+1)), and a general (non-Hermitian) eigensolver.
    r = np.sqrt(2 * np.arange(N) + 1)
    n, k = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    S = -0.5 * np.eye(N) + 0.5 * np.sign(k - n) * np.outer(r, r)
    ev = np.linalg.eigvals(S)
    np.testing.assert_array_equal(a_re, -0.5)
    np.testing.assert_allclose(ev.real, -0.5, atol=1e-9)
    np.testing.assert_allclose(a_im, np.sort(ev.imag), atol=1e-9 * max(1, np.abs(a_im).max()))
    np.testing.assert_allclose(a_im, -a_im[::-1], atol=1e-9 * max(1, np.abs(a_im).max()))
    if N == 2:
        np.testing.assert_allclose(a_im, [-np.sqrt(3) / 2, np.sqrt(3) / 2], rtol=1e-12)


def test_lin_inv_formulas_and_bad_init():
    n = np.arange(64)
    a_re, a_im = ssm_init("lin", 64)
    np.testing.assert_array_equal(a_re, -0.5)
    np.testing.assert_allclose(a_im, np.pi * n, rtol=1e-15)
    a_re, a_im = ssm_init("inv", 64)
    np.testing.assert_array_equal(a_re, -0.5)
    np.testing.assert_allclose(a_im, 64 / np.pi * (64 / (2 * n + 1) - 1), rtol=1e-15)
    with pytest.raises(ValueError, match="legs"):
        ssm_init("hippo", 4)


@pytest.mark.parametrize("shared", [True, False])
def test_param_shapes_values_and_sharding_names(shared):
    D, N = 512, 64
    m = S4D(D, state_size=N, shared=shared, init="inv", dt_min=0.001, dt_max=0.1,
            rngs=nnx.Rngs(1))
    lead, H = ((), 1) if shared else ((D,), D)
    shapes = {"A_re": lead + (N,), "A_im": lead + (N,), "C": lead + (N, 2), "D": (H,),
              "log_step": (H,)}
    assert {k: v.shape for k, v in nnx.state(m, nnx.Param).items()} == shapes
    names = {k: v.get_metadata()["out_sharding"] for k, v in nnx.state(m, nnx.Param).items()}
    lead_ax = () if shared else ("embed",)
    assert names == {"A_re": lead_ax + ("state",), "A_im": lead_ax + ("state",),
                     "C": lead_ax + ("state", None), "D": lead_ax or (None,),
                     "log_step": lead_ax or (None,)}
    np.testing.assert_array_equal(m.A_re[...], -0.5)
    np.testing.assert_allclose(m.A_im[...], np.broadcast_to(ssm_init("inv", N)[1], lead + (N,)),
                               rtol=1e-6)
    np.testing.assert_array_equal(m.D[...], 1.0)
    ls = np.asarray(m.log_step[...])
    assert ls.min() >= np.log(0.001) and ls.max() <= np.log(0.1)
    if not shared:  # uniform: both ends of the range are reached
        assert ls.min() < np.log(0.001) + 0.05 and ls.max() > np.log(0.1) - 0.05
        c = np.asarray(m.C[...])
        assert abs(c.std() - np.sqrt(0.5)) < 0.01 and abs(c.mean()) < 0.01
        assert abs(c[..., 0].std() - c[..., 1].std()) < 0.02


def test_params_carry_logical_axes():
    """The trainer shards params from these names (abstract init → shardings → jitted init)."""
    mesh = jax.make_mesh((1,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nnx.logical_axis_rules([("embed", "tensor"), ("state", None)]):
        state = nnx.state(nnx.eval_shape(lambda: S4D(4, state_size=8, shared=False,
                                                      rngs=nnx.Rngs(0))))
        specs = nnx.get_partition_spec(state)
    P = jax.sharding.PartitionSpec
    assert specs["C"].get_value() == P("tensor", None, None)
    assert specs["log_step"].get_value() == P("tensor")


# ---- kernel -----------------------------------------------------------------------------------


def kernel_rows(seed=0, N=64, inits=("legs", "lin", "inv")):
    """One row per (init, log_step) pair, float32: every combination in one kernel call."""
    rows = [(ssm_init(i, N), ls) for i in inits for ls in LOG_STEPS]
    a_re = np.stack([r[0][0] for r in rows]).astype(np.float32)
    a_im = np.stack([r[0][1] for r in rows]).astype(np.float32)
    c = np.random.default_rng(seed).normal(size=(len(rows), N, 2)) * np.sqrt(0.5)
    return a_re, a_im, c.astype(np.float32), np.array([r[1] for r in rows], np.float32)


@pytest.mark.parametrize("L", [1, 7, 128, 1000, 4096])
def test_kernel_matches_float64_formula(L):
    params = kernel_rows(seed=L)
    K = jax.jit(s4d_kernel, static_argnums=4)(*params, L)
    assert K.dtype == jnp.float32 and K.shape == (15, L)
    ref = ref_kernel(*params, L)
    err = np.abs(np.asarray(K, np.float64) - ref).max(-1) / np.abs(ref).max(-1)
    assert err.max() < 1e-5, err


@pytest.mark.parametrize("shared", [True, False])
def test_module_kernel_uses_its_params(shared):
    m = make_ssm(3, N=16, shared=shared, init="lin")
    K = nnx.jit(lambda m: m.kernel(50))(m)
    assert K.shape == ((1, 50) if shared else (3, 50))
    assert rel_err(K, ref_kernel(*params_H(m), 50)) < 1e-5


def test_kernel_float64_under_x64():
    with jax.enable_x64(True):
        params = tuple(x.astype(np.float64) for x in kernel_rows(seed=3))
        for L in (7, 4096):
            K = jax.jit(s4d_kernel, static_argnums=4)(*params, L)
            assert K.dtype == jnp.float64
            ref = ref_kernel(*params, L)
            assert (np.abs(np.asarray(K) - ref).max(-1) / np.abs(ref).max(-1)).max() < 1e-12
        m = make_ssm(3, N=16, init="inv", param_dtype=jnp.float64)
        u = np.random.default_rng(0).normal(size=(2, 300, 3))
        y = nnx.jit(lambda m, u: m(u))(m, u)
        assert y.dtype == jnp.float64
        assert rel_err(y, ref_conv(ref_kernel(*params_H(m), 300), m.D[...], u)) < 1e-12
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


def test_kernel_gradients_match_float64_autodiff():
    # The accurate fp32 phase goes through a custom JVP; check it against plain autodiff in f64.
    def plain(a_re, a_im, c, ls, L):
        A = jnp.minimum(a_re, -1e-4) + 1j * a_im
        dtA = jnp.exp(ls)[:, None] * A
        cb = (c[..., 0] + 1j * c[..., 1]) * (jnp.exp(dtA) - 1) / A
        decay = jnp.exp(dtA[..., None] * jnp.arange(L)[None, None])
        return jnp.einsum("hn,hnl->hl", cb, decay).real

    L = 300
    params = kernel_rows(seed=5, N=16)
    w = np.random.default_rng(6).normal(size=(15, L)).astype(np.float32)
    grads = jax.jit(jax.grad(lambda *p: jnp.sum(w * s4d_kernel(*p, L)), argnums=(0, 1, 2, 3)))(
        *params)
    with jax.enable_x64(True):
        ref = jax.jit(jax.grad(lambda *p: jnp.sum(w * plain(*p, L)), argnums=(0, 1, 2, 3)))(
            *(jnp.asarray(x, jnp.float64) for x in params))
        ref = [np.asarray(g) for g in ref]
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-5


# ---- convolution paths --------------------------------------------------------------------------

PATH_CASES = [(L, N, shared) for L in (1, 7, 128) for N in (1, 64) for shared in (True, False)]
PATH_CASES += [(1000, 64, True), (1000, 64, False)]


@pytest.mark.parametrize("L,N,shared", PATH_CASES)
def test_fft_scan_recurrent_toeplitz_agree(L, N, shared):
    m = make_ssm(3, N=N, shared=shared, init="legs", seed=L + N)
    u = np.random.default_rng(L).normal(size=(2, L, 3)).astype(np.float32)
    ref = ref_conv(ref_kernel(*params_H(m), L), m.D[...], u)
    for mode, y in apply_all(m, u).items():
        assert y.shape == u.shape and y.dtype == jnp.float32
        assert rel_err(y, ref) < 1e-5, mode


def test_backward_direction_is_anticausal_toeplitz():
    m = make_ssm(4, N=64, shared=True, init="inv", seed=7)
    u = np.random.default_rng(1).normal(size=(2, 200, 4)).astype(np.float32)
    y = jnp.flip(apply(m, jnp.flip(u, 1)), 1)
    ref = ref_conv(ref_kernel(*params_H(m), 200), m.D[...], u, anticausal=True)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_causal_by_gradient(mode):
    m = make_ssm(2, N=8, shared=False, seed=3)
    u = np.random.default_rng(2).normal(size=(1, 16, 2)).astype(np.float32)
    J = jax.jacrev(lambda u: apply(m, u, mode=mode))(u)[0, :, :, 0, :, :]  # (t, d, s, e)
    future = np.arange(16)[:, None] < np.arange(16)[None, :]  # s > t
    J = np.asarray(J).transpose(0, 2, 1, 3)  # (t, s, d, e)
    assert np.abs(J[~future]).max() > 1e-2
    if mode == "fft":  # an FFT mixes all positions in floating point: zero up to round-off
        assert np.abs(J[future]).max() < 1e-6 * np.abs(J).max()
    else:
        assert np.all(J[future] == 0)


@pytest.mark.parametrize("shared", [True, False])
def test_step_generation_equals_fft(shared):
    m = make_ssm(3, N=64, shared=shared, seed=4)
    u = np.random.default_rng(3).normal(size=(2, 40, 3)).astype(np.float32)
    step = jax.jit(lambda graph, state, x, u: nnx.merge(graph, state).step(x, u),
                   static_argnums=0)
    graph, state = nnx.split(m)
    x = m.init_state(2)
    assert x.shape == (2, 3, 64) and x.dtype == jnp.complex64
    ys = []
    for t in range(40):
        x, y_t = step(graph, state, x, u[:, t])
        ys.append(y_t)
    assert rel_err(jnp.stack(ys, 1), np.asarray(apply(m, u), np.float64)) < 1e-5


@pytest.mark.parametrize("shared", [True, False])
def test_final_state_equals_stepped_state(shared):
    """`final_state` of right-padded rows of lengths 1, 17 and 40 (pads hold data) is the state
    `step` reaches after each row's last real token, and stepping on from it continues the
    FFT output."""
    m = make_ssm(3, N=64, shared=shared, seed=6)
    u = np.random.default_rng(5).normal(size=(3, 40, 3)).astype(np.float32)
    lengths = np.array([1, 17, 40], np.int32)
    graph, state = nnx.split(m)
    final = jax.jit(lambda state, u, n: nnx.merge(graph, state).final_state(u, n))
    step = jax.jit(lambda state, x, u: nnx.merge(graph, state).step(x, u))
    x, stepped = m.init_state(3), {}
    for t in range(40):
        x, _ = step(state, x, u[:, t])
        for b in np.flatnonzero(lengths == t + 1):
            stepped[b] = np.asarray(x[b])
    got = np.asarray(final(state, u, lengths))
    for b in range(3):  # complex: rel_err would drop the imaginary parts
        assert np.abs(got[b] - stepped[b]).max() < 1e-5 * np.abs(stepped[b]).max(), b
    _, y = step(state, jnp.asarray(got[:1]), u[:1, 1])  # row 0 continues with token 1
    assert rel_err(y, np.asarray(apply(m, u[:1, :2]), np.float64)[:, 1]) < 1e-5


def test_bf16_input_fft_in_fp32():
    m = make_ssm(3, N=64, seed=5)
    u = jnp.asarray(np.random.default_rng(4).normal(size=(2, 64, 3)), jnp.bfloat16)
    y = apply(m, u)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, np.asarray(apply(m, u.astype(jnp.float32)), np.float64)) < 1e-2


def test_unknown_mode_fails_listing_modes():
    with pytest.raises(ValueError, match="toeplitz"):
        make_ssm(2, N=4)(jnp.zeros((1, 3, 2)), mode="conv")


# ---- direction helpers and padding ------------------------------------------------------------


def padded_batch(seed, B=4, L=24, D=3):
    """Right-padded batch with random lengths (one full, one of length 1) and garbage pads."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[L, 1], rng.integers(2, L, B - 2)])
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    u = rng.normal(size=(B, L, D)) * np.where(mask, 1, 100)[..., None]
    return u.astype(np.float32), mask, lengths


def test_reverse_padded_is_an_involution_that_keeps_pads():
    u, mask, lengths = padded_batch(0)
    r = reverse_padded(u, mask)
    np.testing.assert_array_equal(reverse_padded(r, mask), u)
    np.testing.assert_array_equal(reverse_padded(mask, mask), mask)  # works on (B, L) too
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(r[b, :n], u[b, :n][::-1])
        np.testing.assert_array_equal(r[b, n:], u[b, n:])
    np.testing.assert_array_equal(reverse_padded(u, np.ones_like(mask)), u[:, ::-1])
    np.testing.assert_array_equal(reverse_padded(u, None), u[:, ::-1])
    np.testing.assert_array_equal(reverse_padded(u, mask, official_padding=True), u[:, ::-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_bidirectional_padded_equals_unpadded(seed):
    fwd, bwd = make_ssm(3, N=64, seed=10), make_ssm(3, N=64, shared=False, init="lin", seed=11)
    u, mask, lengths = padded_batch(seed)

    def both(u, mask, official=False):
        ssm_mask = None if official else mask
        y_f = apply(fwd, u, ssm_mask)
        y_b = reverse_padded(apply(bwd, reverse_padded(u, mask, official_padding=official),
                                   ssm_mask), mask, official_padding=official)
        return np.asarray(y_f), np.asarray(y_b)

    y_f, y_b = both(u, mask)
    o_f, o_b = both(u, mask, official=True)
    np.testing.assert_array_equal(o_b, np.asarray(jnp.flip(apply(bwd, jnp.flip(u, 1)), 1)))
    K_f, K_b = ref_kernel(*params_H(fwd), u.shape[1]), ref_kernel(*params_H(bwd), u.shape[1])
    for b, n in enumerate(lengths):  # reference: the unpadded example, direct f64 convolution
        r_f = ref_conv(K_f, fwd.D[...], u[b:b + 1, :n])
        r_b = ref_conv(K_b, bwd.D[...], u[b:b + 1, :n], anticausal=True)
        assert rel_err(y_f[b:b + 1, :n], r_f) < 1e-5
        assert rel_err(y_b[b:b + 1, :n], r_b) < 1e-5
        assert rel_err(o_f[b:b + 1, :n], r_f) < 1e-5  # forward is causal: pads come after
        if n < u.shape[1]:  # the official flip lets the pads into the backward direction
            assert rel_err(o_b[b:b + 1, :n], r_b) > 1e-2


# ---- chunked (matmul) path: precision, anticausal, padding -------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _apply_kw(graph, state, u, mask, mode, anticausal, precision):
    return nnx.merge(graph, state)(u, mask, mode=mode, anticausal=anticausal,
                                   precision=precision)


def chunked_errors(shared, anticausal, L=1000):
    """Relative error of the chunked path at each precision against the fp32 FFT path (and
    of that FFT path against the float64 direct convolution)."""
    m = make_ssm(8, N=64, shared=shared, seed=21)
    u = np.random.default_rng(22).normal(size=(2, L, 8)).astype(np.float32)
    graph, state = nnx.split(m)
    fft = np.asarray(_apply_kw(graph, state, u, None, "fft", anticausal, "fp32"), np.float64)
    ref = ref_conv(ref_kernel(*params_H(m), L), m.D[...], u, anticausal=anticausal)
    errs = {p: rel_err(_apply_kw(graph, state, u, None, "chunked", anticausal, p), fft)
            for p in ("fp32", "bf16_3x", "bf16")}
    return errs, rel_err(fft, ref)


@pytest.mark.parametrize("shared,anticausal", [(True, False), (True, True), (False, True)])
def test_chunked_precisions_against_fft(shared, anticausal):
    """bf16_3x equals the FFT path within 1e-4 relative (acceptance; measured 5.5e-6 to
    7.5e-6); fp32 within 1e-5 (2e-7 to 5e-7); bf16, one bf16 pass, measured 2.8e-3 to 3.7e-3
    of max |y|, bounded at 1e-2. L = 1000 spans 4 chunks, so the state carried between
    chunks is exercised."""
    errs, fft_err = chunked_errors(shared, anticausal)
    assert fft_err < 1e-5
    assert errs["fp32"] < 1e-5, errs
    assert errs["bf16_3x"] < 1e-4, errs
    assert 10 * errs["bf16_3x"] < errs["bf16"] < 1e-2, errs


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_bf16_3x_gradients_against_fft(shared):
    """The backward pass of the chunked path runs its matmuls at bf16_3x too
    (`precision.dot`'s VJP): every gradient (params and input) is within 1e-4 of the fp32
    FFT path's, relative to its max (measured up to 6.2e-6); left to autodiff, the bf16
    cotangents of bf16 products made them 2.4e-3 to 3.3e-3."""
    m = make_ssm(8, N=64, shared=shared, seed=31)
    graph, state = nnx.split(m)
    rng = np.random.default_rng(32)
    u, c = (jnp.asarray(rng.normal(size=(2, 1000, 8)), jnp.float32) for _ in range(2))

    def grads(mode, precision):
        loss = lambda s, u: jnp.sum(nnx.merge(graph, s)(u, mode=mode, precision=precision) * c)
        return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(state, u))

    errs = [rel_err(g, np.asarray(r, np.float64))
            for g, r in zip(grads("chunked", "bf16_3x"), grads("fft", "fp32"), strict=True)]
    assert max(errs) < 1e-4, errs


def test_chunked_anticausal_padded_equals_unpadded_reference():
    """The backward direction without reversal: pads zeroed, anticausal chunked convolution;
    on every real token it equals the unpadded example's anticausal convolution."""
    m = make_ssm(3, N=64, shared=True, seed=12)
    u, mask, lengths = padded_batch(3, L=300)
    y = np.asarray(_apply_kw(*nnx.split(m), u, mask, "chunked", True, "fp32"))
    K = ref_kernel(*params_H(m), 300)
    for b, n in enumerate(lengths):
        assert rel_err(y[b:b + 1, :n], ref_conv(K, m.D[...], u[b:b + 1, :n], True)) < 1e-5


def test_auto_mode_and_bad_precision():
    assert resolve_mode("auto") == ("fft" if jax.default_backend() == "cpu" else "chunked")
    assert resolve_mode("scan") == "scan"
    with pytest.raises(ValueError, match="bf16_3x"):
        make_ssm(2, N=4)(jnp.zeros((1, 3, 2)), mode="chunked", precision="tf32")


def test_scan_mode_trains_in_fft_mode_memory():
    """Compiled peak temporaries of a gradient (params and input) at L = 4096: the scan mode
    stays within 1.5x of the FFT mode's and far below the L states a plain scan keeps
    (bench/bigs_encoder.py measures it at B = 8, D = 1024 too)."""
    B, L, D, N = 2, 4096, 16, 64
    graph, state = nnx.split(make_ssm(D, N=N, seed=13))

    def temp_bytes(mode):
        loss = lambda s, u: jnp.sum(nnx.merge(graph, s)(u, mode=mode) ** 2)
        u = jax.ShapeDtypeStruct((B, L, D), jnp.float32)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            state, u).compile().memory_analysis().temp_size_in_bytes

    scan, fft = temp_bytes("scan"), temp_bytes("fft")
    assert scan <= 1.5 * fft, (scan, fft)
    assert scan < B * L * D * N * 8 / 8, scan  # all L complex64 states would be 8x this


def test_segment_modes_agree_across_chunk_boundaries():
    """Packed rows: every mode equals the float64 convolution of each segment alone, with
    segments that start inside the scan mode's chunks (L = 100: chunks of 16) and its
    anticausal form; chunked falls back to the segment-masked Toeplitz."""
    m = make_ssm(3, N=16, shared=False, seed=14)
    L = 100
    u = np.random.default_rng(15).normal(size=(2, L, 3)).astype(np.float32)
    seg = np.zeros((2, L), np.int32)
    seg[0, :37], seg[0, 37:90], seg[1, :5], seg[1, 5:] = 1, 2, 1, 2
    K = ref_kernel(*params_H(m), L)
    graph, state = nnx.split(m)
    for mode in MODES:
        for anticausal in (False, True):
            y = jax.jit(lambda s, u, seg: nnx.merge(graph, s)(
                u, mode=mode, segment_ids_BL=seg, anticausal=anticausal))(state, u, seg)
            for b in range(2):
                for k in (1, 2):
                    idx = np.flatnonzero(seg[b] == k)
                    ref = ref_conv(K, m.D[...], u[b:b + 1, idx], anticausal)
                    assert rel_err(np.asarray(y)[b:b + 1, idx], ref) < 1e-5, (mode, anticausal)
