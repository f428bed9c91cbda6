"""Benchmark block-diagonal / Monarch projections against dense, and the Monarch DFT vs jnp.fft.

Run:  python bench/monarch.py            (all sizes; ~15 minutes on 2 busy CPU cores)
      python bench/monarch.py --dims 1024 --mlp-dims --fft-sizes 4096 --repeats 3

Table 1 times an MLP up-projection x (T, d) -> (T, 4d), jitted, median of --repeats runs after
warm-up: the dense `x @ W` with W = the materialized block-diagonal matrix (so `err` checks that
the structured layer computes the same function), `blockdiag_matmul` with 4 blocks (the M2-BERT
MLP), the plain einsum formulation of it (what `blockdiag_matmul` runs off CPU), and a two-factor
Monarch with ~√d blocks. "fwd+bwd" differentiates 0.5·|y|² w.r.t. x and the weights. Speedups
and efficiencies (achieved GFLOP/s over the dense GFLOP/s) are relative to the dense row.

Table 2 times the whole M2-BERT GLU MLP (4-block up- and down-projections, GELU gate, residual)
with each matmul formulation: XLA picks layouts across the neighbouring elementwise ops here, so
this, not table 1, is what a model sees.

Table 3 times the Monarch DFT (two GEMMs of size ~√N) against jnp.fft (XLA's FFT library) for
complex and real inputs and for the causal FFT convolution used by the M2 long conv.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigs_jax.layers import monarch
from monarch_two_factor import monarch_matmul  # bench/ is on sys.path when run


def time_ms(calls: dict, repeats: int) -> dict:
    """Median wall time in ms of each `name -> (fn, args)`, after a compile and a warm-up call.

    Rounds interleave the calls so that load from other processes on a shared machine hits all
    of them alike and the ratios stay meaningful.
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def fwd_bwd(f):
    """jit of grad of 0.5·|f(x, *w)|² w.r.t. all args (forward and backward both run)."""
    def loss(*a):
        return 0.5 * jnp.sum(jnp.square(f(*a)))

    return jax.jit(lambda *a: jax.grad(loss, argnums=tuple(range(len(a))))(*a))


def monarch_blocks(d: int) -> int:
    """The divisor of d closest to √d (ties: the smaller)."""
    return min((b for b in range(1, d + 1) if d % b == 0), key=lambda b: (abs(b - math.sqrt(d)), b))


def projection_table(dims, tokens: int, repeats: int) -> None:
    print(f"\n## MLP up-projection x ({tokens}, d) -> ({tokens}, 4d), fp32, median of {repeats}")
    hdr = (f"{'d':>5} {'method':<24} {'GFLOP':>7} {'fwd ms':>9} {'speedup':>8} {'GFLOP/s':>8} "
           f"{'eff':>6} {'fwd+bwd ms':>11} {'speedup':>8} {'err':>8}")
    print(hdr)
    print("-" * len(hdr))
    key = jax.random.key(0)
    for d in dims:
        kx, kw, kr, kl = jax.random.split(jax.random.fold_in(key, d), 4)
        x = jax.random.normal(kx, (tokens, d), jnp.float32)
        w_bd = jax.random.normal(kw, (4, d // 4, d), jnp.float32) / math.sqrt(d // 4)
        w_dense = monarch.blockdiag_to_dense(w_bd)
        nb = monarch_blocks(d)
        # fly MonarchLinear shapes for in < out: (nb, d/nb, d/nb) then (nb, d/nb, 4d/nb).
        r_KPQ = jax.random.normal(kr, (nb, d // nb, d // nb), jnp.float32) / math.sqrt(d // nb)
        l_JRS = jax.random.normal(kl, (nb, d // nb, 4 * d // nb), jnp.float32) / math.sqrt(d // nb)
        rows = [
            ("dense x @ W", lambda x, w: x @ w, (w_dense,), 2 * tokens * d * 4 * d),
            ("blockdiag K=4", monarch.blockdiag_matmul, (w_bd,), 2 * tokens * d * d),
            ("blockdiag K=4 (einsum)", functools.partial(monarch._blockdiag_einsum, precision=None),
             (w_bd,), 2 * tokens * d * d),
            (f"monarch K={nb}", monarch_matmul, (r_KPQ, l_JRS),
             2 * tokens * (d * d // nb + 4 * d * d // nb)),
        ]
        fwd = time_ms({name: (jax.jit(f), (x, *w)) for name, f, w, _ in rows}, repeats)
        bwd = time_ms({name: (fwd_bwd(f), (x, *w)) for name, f, w, _ in rows}, repeats)
        y_dense = np.asarray(jax.jit(rows[0][1])(x, w_dense))
        base = rows[0][0]
        base_rate = rows[0][3] / fwd[base]
        for name, f, weights, flops in rows:
            rate = flops / fwd[name]
            err = ""
            if name.startswith("blockdiag"):
                y = np.asarray(jax.jit(f)(x, *weights))
                err = f"{np.abs(y - y_dense).max() / np.abs(y_dense).max():.1e}"
            print(f"{d:>5} {name:<24} {flops / 1e9:>7.2f} {fwd[name]:>9.2f} "
                  f"{fwd[base] / fwd[name]:>7.2f}x {rate / 1e6:>8.1f} {rate / base_rate:>6.2f} "
                  f"{bwd[name]:>11.2f} {bwd[base] / bwd[name]:>7.2f}x {err:>8}", flush=True)


def glu_mlp(matmul):
    """The M2-BERT MLP: a = x W1 (d -> 2I), m = gelu(a[:, :I]) * a[:, I:], y = m W2 + x."""
    def f(x, w1, w2):
        inner = w1.shape[-1] // 2 if w1.ndim == 2 else w1.shape[0] * w1.shape[2] // 2
        a = matmul(x, w1)
        return matmul(jax.nn.gelu(a[:, :inner], approximate=False) * a[:, inner:], w2) + x
    return f


def mlp_train_grad(f):
    """jit of the gradients of <f(x, w1, w2), c> w.r.t. x, w1 and w2."""
    def loss(x, w1, w2, c):
        return jnp.sum(f(x, w1, w2) * c)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def mlp_table(dims, tokens: int, repeats: int) -> None:
    print(f"\n## M2 GLU MLP x ({tokens}, d) -> 8d -> d, 4 blocks, in context with its "
          f"elementwise neighbours, median of {repeats}")
    hdr = f"{'d':>5} {'matmul':<24} {'fwd ms':>9} {'speedup':>8} {'fwd+bwd ms':>11} {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    for d in dims:
        keys = jax.random.split(jax.random.fold_in(jax.random.key(2), d), 4)
        x = jax.random.normal(keys[0], (tokens, d), jnp.float32)
        c = jax.random.normal(keys[1], (tokens, d), jnp.float32)
        w1 = jax.random.normal(keys[2], (4, d // 4, 2 * d), jnp.float32) / math.sqrt(d // 4)
        w2 = jax.random.normal(keys[3], (4, d, d // 4), jnp.float32) / math.sqrt(d)
        dense_w = (monarch.blockdiag_to_dense(w1), monarch.blockdiag_to_dense(w2))
        rows = [
            ("dense", glu_mlp(lambda x, w: x @ w), dense_w),
            ("blockdiag_matmul", glu_mlp(monarch.blockdiag_matmul), (w1, w2)),
            ("blockdiag (einsum)", glu_mlp(functools.partial(monarch._blockdiag_einsum,
                                                             precision=None)), (w1, w2)),
        ]

        fwd = time_ms({name: (jax.jit(f), (x, *w)) for name, f, w in rows}, repeats)
        bwd = time_ms({name: (mlp_train_grad(f), (x, *w, c)) for name, f, w in rows}, repeats)
        for name, _, _ in rows:
            print(f"{d:>5} {name:<24} {fwd[name]:>9.2f} {fwd['dense'] / fwd[name]:>7.2f}x "
                  f"{bwd[name]:>11.2f} {bwd['dense'] / bwd[name]:>7.2f}x", flush=True)


def dft_table(sizes, max_points: int, repeats: int) -> None:
    print(f"\n## Monarch DFT vs jnp.fft, batch = min(768, {max_points} // N), median of {repeats}")
    hdr = (f"{'N':>6} {'batch':>5} {'U x V':>9} {'transform':<10} {'jnp.fft ms':>10} "
           f"{'monarch ms':>10} {'monarch/jnp':>11} {'GEMM GFLOP/s':>12} {'err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        batch = min(768, max_points // n)
        kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), n))
        xr = jax.random.normal(kx, (batch, n), jnp.float32)
        xc = jax.lax.complex(xr, jax.random.normal(ky, (batch, n), jnp.float32))
        k = xr[:, : n // 2] * jnp.exp(-jnp.arange(n // 2) / n)
        u, v = monarch.dft_factors(n)
        uh, vh = monarch.dft_factors(n // 2)
        cases = [  # name, ours, theirs, args, GEMM flops of ours
            ("fft c64", monarch.monarch_fft, jnp.fft.fft, (xc,), 8 * batch * n * (u + v)),
            ("fft f32", monarch.monarch_fft, jnp.fft.fft, (xr,), 8 * batch * n * (u + v)),
            ("rfft f32", monarch.monarch_rfft, jnp.fft.rfft, (xr,),
             8 * batch * (n // 2) * (uh + vh)),
            (f"conv L={n // 2}", lambda a, b, n=n: monarch.fft_conv(a, b, n, True),
             lambda a, b, n=n: monarch.fft_conv(a, b, n, False), (xr[:, : n // 2], k),
             3 * 8 * batch * (n // 2) * (uh + vh)),
        ]
        calls = {}
        for name, ours, theirs, args, _ in cases:
            calls[name, "jnp"] = (jax.jit(theirs), args)
            calls[name, "monarch"] = (jax.jit(ours), args)
        ms = time_ms(calls, repeats)
        for name, _, _, args, flops in cases:
            ref = np.asarray(calls[name, "jnp"][0](*args))
            err = np.abs(np.asarray(calls[name, "monarch"][0](*args)) - ref).max() / np.abs(
                ref).max()
            t_ref, t_ours = ms[name, "jnp"], ms[name, "monarch"]
            print(f"{n:>6} {batch:>5} {f'{u}x{v}':>9} {name:<10} {t_ref:>10.2f} {t_ours:>10.2f} "
                  f"{t_ours / t_ref:>10.1f}x {flops / t_ours / 1e6:>12.1f} {err:>8.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[768, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=2048, help="B·L rows of x")
    parser.add_argument("--mlp-dims", type=int, nargs="*", default=[768, 1024])
    parser.add_argument("--fft-sizes", type=int, nargs="*", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--fft-points", type=int, default=1 << 22, help="max batch·N per DFT")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"# bench/monarch.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"{platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"usable cores={len(os.sched_getaffinity(0))}, load avg={os.getloadavg()[0]:.2f}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.dims:
        projection_table(args.dims, args.tokens, args.repeats)
    if args.mlp_dims:
        mlp_table(args.mlp_dims, args.tokens, args.repeats)
    if args.fft_sizes:
        dft_table(args.fft_sizes, args.fft_points, args.repeats)


if __name__ == "__main__":
    main()
