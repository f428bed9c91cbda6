"""Official BiGS checkpoints (Flax msgpack and PyTorch port) → bigs_jax, against the numpy
reference of the official forward pass."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx, serialization

import bigs_jax
from bigs_jax.convert.__main__ import main as cli
from tests.reference.bigs_numpy import bigs_mlm_forward

V, D, F, N, L, LAYERS = 97, 32, 48, 8, 24, 2
CONFIG = {  # the keys of the released config.json files (research/bigs.md §1.3)
    "model_type": "BiGS", "architectures": ["FlaxBiGSForMaskedLM"], "vocab_size": V,
    "hidden_size": D, "num_hidden_layers": LAYERS, "intermediate_size": F, "num_ssm": N,
    "max_position_embeddings": L, "type_vocab_size": 2, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "layer_norm_eps": 1e-12, "pre_norm": True,
    "initializer_range": 0.02,
}
DENSES = {"dv": (D, F), "du_forward": (D, D), "du_backward": (D, D), "duc_forward": (D, D),
          "duc_backward": (D, D), "dol": (D, F), "do": (F, D)}


def official_tree(seed=0, classifier_labels=0):
    """Random params under the exact official Flax names and shapes."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=0.2: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa
    norm = lambda: {"scale": 1 + f32(D, scale=0.1), "bias": f32(D, scale=0.1)}  # noqa
    dense = lambda i, o: {"kernel": f32(i, o), "bias": f32(o, scale=0.05)}  # noqa

    def ssm():
        return {"A_re": -rng.uniform(0.1, 1.0, N).astype(np.float32),
                "A_im": (np.pi * np.arange(N)).astype(np.float32) + f32(N),
                "C": f32(N, 2, scale=0.7), "D": f32(1, scale=1.0),
                "log_step": rng.uniform(np.log(0.01), np.log(1.0), 1).astype(np.float32)}

    layers = {str(i): {"LayerNorm": norm(), "fs4": ssm(), "bs4": ssm(),
                       **{k: dense(*s) for k, s in DENSES.items()}} for i in range(LAYERS)}
    s4_bert = {"embeddings": {"word_embeddings": {"embedding": f32(V, D)},
                              "position_embeddings": {"embedding": f32(L, D)},
                              "token_type_embeddings": {"embedding": f32(2, D)},
                              "LayerNorm": norm()},
               "encoder": {"layer": layers}}
    if classifier_labels:
        s4_bert["pooler"] = {"dense": dense(D, D)}
        return {"s4_bert": s4_bert, "classifier": dense(D, classifier_labels)}
    cls = {"predictions": {"transform": {"dense": dense(D, D), "LayerNorm": norm()},
                           "bias": f32(V, scale=0.1)}}
    return {"s4_bert": s4_bert, "cls": cls}


def write_flax(path, tree, config=CONFIG):
    os.makedirs(path)
    with open(os.path.join(path, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def torch_state_dict(tree):
    """The PyTorch port's state dict (modeling_bigs.py names) holding the same values."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa
    sd = {}
    emb = tree["s4_bert"]["embeddings"]
    for name in ("word", "position", "token_type"):
        sd[f"bigs.embeddings.{name}_embeddings.weight"] = t(emb[f"{name}_embeddings"]["embedding"])
    sd["bigs.embeddings.LayerNorm.weight"] = t(emb["LayerNorm"]["scale"])
    sd["bigs.embeddings.LayerNorm.bias"] = t(emb["LayerNorm"]["bias"])
    sd["bigs.embeddings.position_ids"] = torch.arange(L)[None]
    for i, p in tree["s4_bert"]["encoder"]["layer"].items():
        pre = f"bigs.encoder.layer.{i}"
        sd[f"{pre}.LayerNorm.weight"] = t(p["LayerNorm"]["scale"])
        sd[f"{pre}.LayerNorm.bias"] = t(p["LayerNorm"]["bias"])
        for d in ("fs4", "bs4"):
            sd[f"{pre}.{d}.D"] = t(p[d]["D"])
            for k in ("A_re", "A_im", "C", "log_step"):
                sd[f"{pre}.{d}.kernel.{k}"] = t(p[d][k])
        for d in DENSES:
            sd[f"{pre}.{d}.weight"] = t(p[d]["kernel"].T)
            sd[f"{pre}.{d}.bias"] = t(p[d]["bias"])
    # modeling_bigs builds a pooler into every model; an MLM checkpoint carries a random one.
    sd["bigs.pooler.dense.weight"] = torch.randn(D, D)
    sd["bigs.pooler.dense.bias"] = torch.zeros(D)
    head = tree["cls"]["predictions"]
    sd["cls.predictions.transform.dense.weight"] = t(head["transform"]["dense"]["kernel"].T)
    sd["cls.predictions.transform.dense.bias"] = t(head["transform"]["dense"]["bias"])
    sd["cls.predictions.transform.LayerNorm.weight"] = t(head["transform"]["LayerNorm"]["scale"])
    sd["cls.predictions.transform.LayerNorm.bias"] = t(head["transform"]["LayerNorm"]["bias"])
    sd["cls.predictions.bias"] = t(head["bias"])
    sd["cls.predictions.decoder.weight"] = sd["bigs.embeddings.word_embeddings.weight"]
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    return sd


def padded_ids(seed=2):
    ids = np.random.default_rng(seed).integers(1, V, (3, L))
    ids[1, 15:] = 0  # padded the way the official scripts pad: [PAD] = 0 to max length
    ids[2, 5:] = 0
    return ids, (ids != 0).astype(np.int32)


def leaves(model):
    return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]


def test_msgpack_matches_numpy_reference_with_official_padding(tmp_path):
    tree = official_tree()
    src = write_flax(tmp_path / "BiGS_24", tree)
    dst = str(tmp_path / "ours")
    assert cli([src, dst, "--official-padding"]) == 0
    model = bigs_jax.load(dst)
    c = model.config
    assert (c.block, c.mixer, c.head, c.max_len, c.ssm_state, c.official_padding) == (
        "gated", "ssm", "mlm", L, N, True)
    ids, mask = padded_ids()
    h_ref, logits_ref = bigs_mlm_forward(tree, ids)
    out = model(ids, mask)
    err_logits = np.abs(np.asarray(out.logits) - logits_ref).max()
    err_hidden = np.abs(np.asarray(out.hidden_states) - h_ref).max()
    assert err_logits < 1e-5 and err_hidden < 1e-5, (err_logits, err_hidden)
    print(f"BiGS official parity: logits max abs err {err_logits:.2e} (max |logit| "
          f"{np.abs(logits_ref).max():.1f}), hidden {err_hidden:.2e}")


def test_default_is_padding_correct(tmp_path):
    """Without the flag the same weights give a padding-correct model: unpadded rows equal the
    official forward exactly, padded rows no longer see their pads."""
    tree = official_tree()
    src = write_flax(tmp_path / "src", tree)
    assert cli([src, str(tmp_path / "ours")]) == 0
    model = bigs_jax.load(str(tmp_path / "ours"))
    assert model.config.official_padding is False
    ids, mask = padded_ids()
    _, logits_ref = bigs_mlm_forward(tree, ids)
    diff = np.abs(np.asarray(model(ids, mask).logits) - logits_ref).max(axis=(1, 2))
    scale = np.abs(logits_ref).max()
    assert diff[0] < 1e-5 * scale and diff[1] > 1e-3 * scale
    alone = np.asarray(model(ids[1:2, :15], mask[1:2, :15]).logits)
    np.testing.assert_allclose(np.asarray(model(ids, mask).logits)[1, :15], alone[0],
                               atol=1e-5 * scale)


def test_detects_msgpack_without_model_type(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "model_type"}
    src = write_flax(tmp_path / "src", official_tree(), config)
    assert cli([src, str(tmp_path / "ours")]) == 0
    assert bigs_jax.load(str(tmp_path / "ours")).config.block == "gated"


def test_torch_port_converts_to_identical_params(tmp_path):
    torch = pytest.importorskip("torch")
    tree = official_tree()
    flax_src = write_flax(tmp_path / "flax", tree)
    torch_src = tmp_path / "torch"
    os.makedirs(torch_src)
    torch.save(torch_state_dict(tree), torch_src / "pytorch_model.bin")
    with open(torch_src / "config.json", "w") as f:
        json.dump({**CONFIG, "architectures": ["BiGSForMaskedLM"]}, f)
    assert cli([flax_src, str(tmp_path / "a")]) == 0
    assert cli([str(torch_src), str(tmp_path / "b")]) == 0
    a, b = bigs_jax.load(str(tmp_path / "a")), bigs_jax.load(str(tmp_path / "b"))
    assert a.config == b.config
    for (path, x), (_, y) in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("pooler_type", [None, "mean"])
def test_mnli_classifier(tmp_path, pooler_type):
    """*_MNLI layout: s4_bert/pooler + classifier → classification head; pooler from config
    (absent → non_padding_mean as in BiGS_512; BiGS_128 says mean)."""
    tree = official_tree(classifier_labels=3)
    config = {**CONFIG, "architectures": ["FlaxBiGSForSequenceClassification"],
              "id2label": {"0": "entailment", "1": "neutral", "2": "contradiction"}}
    if pooler_type:
        config["pooler_type"] = pooler_type
    src = write_flax(tmp_path / "mnli", tree, config)
    assert cli([src, str(tmp_path / "ours"), "--official-padding"]) == 0
    model = bigs_jax.load(str(tmp_path / "ours"))
    assert model.config.head == "classification" and model.config.num_labels == 3
    assert model.config.pooler == (pooler_type or "non_padding_mean")
    ids, mask = padded_ids()
    # The numpy reference needs an MLM head to run; give it a dummy one, read hidden states.
    dummy = official_tree()["cls"]
    h_ref, _ = bigs_mlm_forward({"s4_bert": tree["s4_bert"], "cls": dummy}, ids)
    w = mask[..., None] if pooler_type is None else np.ones_like(mask)[..., None]
    pooled = (h_ref * w).sum(1) / w.sum(1)
    p, c = tree["s4_bert"]["pooler"]["dense"], tree["classifier"]
    logits_ref = np.tanh(pooled @ p["kernel"] + p["bias"]) @ c["kernel"] + c["bias"]
    logits = np.asarray(model(ids, mask).logits)
    assert np.abs(logits - logits_ref).max() < 1e-5
