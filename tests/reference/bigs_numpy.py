"""Float64 numpy re-implementation of the official BiGS MLM forward pass (test reference).

Written from the equations in research/bigs.md §1.3, reading parameters by their official
checkpoint names (`s4_bert/...`, `cls/...`), with the official padding behaviour: no mask in
the SSMs, and the backward direction flips the whole padded length.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def layer_norm(x, scale, bias, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def s4d_kernel(p, L):
    """K[l] = Re Σ_n C_n (exp(ΔA_n) − 1)/A_n exp(l Δ A_n) for one shared SSM."""
    a = np.minimum(p["A_re"].astype(np.float64), -1e-4) + 1j * p["A_im"].astype(np.float64)
    c = p["C"][:, 0].astype(np.float64) + 1j * p["C"][:, 1].astype(np.float64)
    dt = np.exp(p["log_step"].astype(np.float64)[0])
    l = np.arange(L)[:, None]
    return (c * (np.exp(dt * a) - 1) / a * np.exp(l * dt * a)).sum(-1).real


def causal_conv(u_LD, k_L, d):
    """y[t] = Σ_{s≤t} K[t−s] u[s] + D u[t], by a dense Toeplitz matrix."""
    L = len(k_L)
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    T = np.where(t >= s, k_L[np.clip(t - s, 0, L - 1)], 0.0)
    return T @ u_LD + float(d[0]) * u_LD


def dense(x, p):
    return x @ p["kernel"].astype(np.float64) + p["bias"].astype(np.float64)


def bigs_mlm_forward(params, ids_BL, type_ids_BL=None):
    """(hidden_states (B,L,D), logits (B,L,C)) of FlaxBiGSForMaskedLM, in float64."""
    emb = params["s4_bert"]["embeddings"]
    B, L = ids_BL.shape
    tt = np.zeros_like(ids_BL) if type_ids_BL is None else type_ids_BL
    x = (emb["word_embeddings"]["embedding"][ids_BL].astype(np.float64)
         + emb["position_embeddings"]["embedding"][:L].astype(np.float64)
         + emb["token_type_embeddings"]["embedding"][tt].astype(np.float64))
    x = layer_norm(x, emb["LayerNorm"]["scale"], emb["LayerNorm"]["bias"])
    layers = params["s4_bert"]["encoder"]["layer"]
    for i in range(len(layers)):
        p = layers[str(i)]
        outs = []
        for b in range(B):
            z = layer_norm(x[b], p["LayerNorm"]["scale"], p["LayerNorm"]["bias"])
            v = gelu_tanh(dense(z, p["dv"]))
            f = gelu_tanh(dense(z, p["du_forward"]))
            bk = gelu_tanh(dense(z[::-1], p["du_backward"]))
            f = causal_conv(f, s4d_kernel(p["fs4"], L), p["fs4"]["D"])
            bk = causal_conv(bk, s4d_kernel(p["bs4"], L), p["bs4"]["D"])
            uf = dense(f, p["duc_forward"])
            ub = dense(bk, p["duc_backward"])[::-1]
            h = gelu_tanh(dense(uf * ub, p["dol"]))
            outs.append(x[b] + dense(h * v, p["do"]))
        x = np.stack(outs)
    head = params["cls"]["predictions"]
    h = gelu_exact(dense(x, head["transform"]["dense"]))
    norm = head["transform"]["LayerNorm"]
    h = layer_norm(h, norm["scale"], norm["bias"])
    logits = h @ emb["word_embeddings"]["embedding"].astype(np.float64).T + head["bias"]
    return x, logits
