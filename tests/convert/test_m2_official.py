"""Official M2-BERT state dicts (pytorch_model.bin, Composer model.pt) → bigs_jax workdir,
checked against a numpy transcription of the official forward on the official tensors."""

import os

import numpy as np
import pytest
from scipy.special import erf

import bigs_jax
from bigs_jax.convert.common import ConversionError
from bigs_jax.convert.m2_official import convert, import_tensors
from bigs_jax.layers.longconv import modulation_deltas, positional_features
from tests.reference.m2_shapes import official_shapes

torch = pytest.importorskip("torch")
H, I, LAYERS, V, L, ORDER = 16, 32, 2, 40, 12, 8


def official_state(seed=0, legacy=True, head="mlm", positions=True):
    rng = np.random.default_rng(seed)
    shapes = official_shapes(H, I, LAYERS, V=V, L=L, order=ORDER, legacy=legacy,
                             positions=positions)
    sd = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}
    sd["bert.embeddings.position_ids"] = np.arange(L)[None]
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    for k in sd:
        if k.endswith(("LayerNorm.weight", "layernorm.weight")):
            sd[k] = 1 + 0.1 * sd[k]
        if k.endswith("pos_emb.z"):
            sd[k] = positional_features(L)[None] + 0.01 * sd[k]
        if k.endswith("pos_emb.t"):
            sd[k] = np.linspace(0, 1, L, dtype=np.float32)[None, :, None]
        if k.endswith("modulation.deltas"):
            sd[k] = modulation_deltas(H)[None, None]
        if k.endswith(".freq"):  # one shared tensor per filter, six aliases
            sd[k] = sd[k.rsplit(".", 3)[0] + ".implicit_filter.1.freq"] = np.full(
                (1, ORDER), 10.0, np.float32) if "filter_fn2" in k else np.full(
                (1, ORDER), 3.0, np.float32)
    if head == "pooler":
        for k in [k for k in sd if k.startswith("cls.")]:
            del sd[k]
        sd["bert.pooler.dense.weight"] = rng.standard_normal((H, H)).astype(np.float32) * 0.3
        sd["bert.pooler.dense.bias"] = rng.standard_normal(H).astype(np.float32) * 0.1
    return sd


def _ln(x, w, b, eps=1e-12):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def official_forward(sd, ids, legacy=True):
    """numpy transcription of bert_layers.py / monarch_mixer_sequence_mixer.py (torch layouts)."""
    g = lambda k: sd[k].astype(np.float64)
    n = ids.shape[1]
    x = (g("bert.embeddings.word_embeddings.weight")[ids]
         + g("bert.embeddings.token_type_embeddings.weight")[0])
    if "bert.embeddings.position_embeddings.weight" in sd:  # use_positional_encodings
        x = x + g("bert.embeddings.position_embeddings.weight")[:n]
    x = _ln(x, g("bert.embeddings.LayerNorm.weight"), g("bert.embeddings.LayerNorm.bias"))

    def hyena(p, u):
        z, t = g(f"{p}.pos_emb.z")[0, :n], g(f"{p}.pos_emb.t")[0, :n]
        decay = np.exp(-t * np.abs(g(f"{p}.modulation.deltas")[0]))

        def mlp(m):
            h = z
            for j in (0, 2, 4):
                h = np.sin(g(f"{p}.{m}.{j + 1}.freq") * (h @ g(f"{p}.{m}.{j}.weight").T
                                                         + g(f"{p}.{m}.{j}.bias")))
            return (h @ g(f"{p}.{m}.6.weight").T) * decay

        k = (np.pad(mlp("implicit_filter"), ((0, n), (0, 0)))
             + np.pad(mlp("implicit_filter_rev")[::-1], ((n, 0), (0, 0))))
        k_f = np.fft.rfft(k, n=2 * n, axis=0) / (2 * n)
        y = np.fft.irfft(np.fft.rfft(u, n=2 * n, axis=1) * k_f, n=2 * n, axis=1,
                         norm="forward")[:, :n]
        return y + u * g(f"{p}.bias")

    for i in range(LAYERS):
        a, m = f"bert.encoder.layer.{i}.attention", f"bert.encoder.layer.{i}.mlp"
        u = _ln(x, g(f"{a}.layernorm.weight"), g(f"{a}.layernorm.bias")) if legacy else x
        z = u @ g(f"{a}.in_linear.weight").T + g(f"{a}.in_linear.bias")
        w = g(f"{a}.short_filter.weight")[:, 0]                      # (3H, 3)
        zp = np.pad(z, ((0, 0), (2, 2), (0, 0)))
        z = np.stack([(zp[:, t:t + 3] * w.T).sum(1) for t in range(n)], 1) + g(
            f"{a}.short_filter.bias")
        x1, x2, v = np.split(z, 3, axis=-1)
        y = hyena(f"{a}.filter_fn", v * x1) * x2
        y = y + hyena(f"{a}.filter_fn2", u)
        y = y @ g(f"{a}.out_linear.weight").T + g(f"{a}.out_linear.bias")

        def bd(t, wt):  # blockdiag_multiply: weight (k, q, p)
            k = wt.shape[0]
            xs = t.reshape(*t.shape[:-1], k, -1)
            return np.einsum("...kp,kqp->...kq", xs, wt).reshape(*t.shape[:-1], -1)

        hdn = bd(y, g(f"{m}.gated_layers.weight"))
        hdn = _gelu(hdn[..., :I]) * hdn[..., I:]
        x = _ln(bd(hdn, g(f"{m}.wo.weight")) + g(f"{m}.wo.bias") + y,
                g(f"{m}.layernorm.weight"), g(f"{m}.layernorm.bias"))
    return x


def _save_bin(sd, path, prefix=""):
    torch.save({prefix + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
               path)


@pytest.mark.parametrize("layout,positions", [("bin", True), ("composer", True),
                                              ("bin", False)])
def test_convert_matches_official_forward(tmp_path, layout, positions):
    sd = official_state(positions=positions)
    src = tmp_path / "src"
    src.mkdir()
    if layout == "bin":
        _save_bin(sd, src / "pytorch_model.bin", prefix="module.")
    else:
        torch.save({"state": {"model": {"model." + k: torch.from_numpy(np.ascontiguousarray(v))
                                        for k, v in sd.items()}}}, src / "model.pt")
    imported = convert(str(src), str(tmp_path / "wd"))
    assert imported.config.mixer_norm and imported.config.head == "mlm"
    assert imported.config.intermediate_size == I and imported.config.filter_order == ORDER
    assert imported.config.positions == positions and imported.config.max_len == L
    model = bigs_jax.load(str(tmp_path / "wd"))
    ids = np.random.default_rng(1).integers(0, V, (2, L))
    ref = official_forward(sd, ids)
    out = model(ids)
    assert np.abs(np.asarray(out.hidden_states) - ref).max() < 1e-4
    # the MLM head: dense → gelu → LN → tied decoder + bias
    t = _gelu(ref @ sd["cls.predictions.transform.dense.weight"].T
              + sd["cls.predictions.transform.dense.bias"])
    t = _ln(t, sd["cls.predictions.transform.LayerNorm.weight"],
            sd["cls.predictions.transform.LayerNorm.bias"])
    logits = t @ sd["bert.embeddings.word_embeddings.weight"].T + sd[
        "cls.predictions.decoder.bias"]
    assert np.abs(np.asarray(out.logits) - logits).max() < 1e-3


def test_retrieval_pooler_layout(tmp_path):
    sd = official_state(legacy=False, head="pooler")
    imported = import_tensors(sd, source="retrieval")
    assert imported.config.head == "pooler" and not imported.config.mixer_norm
    np.testing.assert_array_equal(imported.params["pooler/kernel"],
                                  sd["bert.pooler.dense.weight"].T)


def test_all_problems_in_one_error_and_nothing_written(tmp_path):
    sd = official_state()
    del sd["bert.encoder.layer.1.attention.out_linear.bias"]
    sd["bert.encoder.layer.0.mlp.wo.bias"] = np.zeros(H + 1, np.float32)
    sd["bert.encoder.layer.0.attention.mystery"] = np.zeros(3, np.float32)
    src = tmp_path / "src"
    src.mkdir()
    _save_bin(sd, src / "pytorch_model.bin")
    with pytest.raises(ConversionError) as e:
        convert(str(src), str(tmp_path / "wd"))
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "layer.1.attention.out_linear.bias" in msg and "mystery" in msg
    assert "layer.0.mlp.wo.bias" in msg
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_aliased_freq_must_agree():
    sd = official_state()
    sd["bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"] += 1
    with pytest.raises(ConversionError, match="implicit_filter_rev.3.freq"):
        import_tensors(sd)
