"""A vocabulary padded for tensor parallelism (`vocab_multiple`) is invisible outside the model:
import pads, the pad logits take no probability, export writes the unpadded HF layout."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.convert.__main__ import main as cli
from bigs_jax.convert.common import read_safetensors
from bigs_jax.layers.embeddings import PAD_LOGIT
from bigs_jax.train import checkpointing, partitioning
from tests.convert.tiny_hf import batch, save_tiny, torch_out
from tests.convert.tiny_hf import transformers as tr

V = 61  # padded to 64 by --vocab-multiple 16


def hf_model(kind, tied, path):
    if kind == "gpt2":
        config = tr.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=2, n_positions=32,
                               tie_word_embeddings=tied)
        return save_tiny(tr.GPT2LMHeadModel, config, path)
    config = tr.BertConfig(vocab_size=V, hidden_size=24, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=40,
                           max_position_embeddings=32)
    return save_tiny(tr.BertForMaskedLM, config, path)


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("gpt2", False), ("bert", True)])
def test_padded_import_matches_hf_and_exports_the_unpadded_layout(tmp_path, kind, tied):
    dirs = {n: str(tmp_path / n) for n in ("hf", "plain", "padded", "plain_hf", "padded_hf")}
    model_hf = hf_model(kind, tied, dirs["hf"])
    ids, mask, types = batch(V)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if kind == "bert":
        inputs["token_type_ids"] = types
    ref = torch_out(model_hf, **inputs).logits.numpy()

    assert cli([dirs["hf"], dirs["plain"]]) == 0
    assert cli([dirs["hf"], dirs["padded"], "--vocab-multiple", "16"]) == 0
    model = bigs_jax.load(dirs["padded"])
    assert model.config.vocab_multiple == 16
    assert model.embeddings.word.embedding[...].shape[0] == 64
    logits = np.asarray(model(*inputs.values()).logits)
    assert logits.shape[-1] == 64
    real = mask.astype(bool) if kind == "gpt2" else np.ones_like(mask, bool)
    assert np.abs(logits[..., :V] - ref)[real].max() < 1e-4
    np.testing.assert_array_equal(logits[..., V:], PAD_LOGIT)
    assert float(np.asarray(jax.nn.softmax(logits, axis=-1))[..., V:].max()) == 0.0

    assert cli([dirs["plain"], dirs["plain_hf"], "--to", "hf"]) == 0
    assert cli([dirs["padded"], dirs["padded_hf"], "--to", "hf"]) == 0
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(dirs["plain_hf"], name), "rb") as a, \
                open(os.path.join(dirs["padded_hf"], name), "rb") as b:
            assert a.read() == b.read(), name
    original = read_safetensors(os.path.join(dirs["hf"], "model.safetensors"))
    for name, value in read_safetensors(os.path.join(dirs["padded_hf"],
                                                     "model.safetensors")).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_vocab_multiple_below_one_is_refused(tmp_path, capsys):
    hf_model("gpt2", True, str(tmp_path / "hf"))
    assert cli([str(tmp_path / "hf"), str(tmp_path / "out"), "--vocab-multiple", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vocab_multiple must be >= 1" in err
    assert not os.path.exists(tmp_path / "out")


def test_init_from_an_unpadded_checkpoint_pads_the_vocabulary(tmp_path):
    """config.init's restore (checkpointing.restore_matching) of a converted, unpadded BERT into
    a run's padded model: the real rows restored, the pad rows zero, the same logits."""
    model_hf = hf_model("bert", True, str(tmp_path / "hf"))
    assert cli([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    base = checkpointing.read_model_config(str(tmp_path / "ours"))
    assert base.vocab_multiple == 1
    padded = dataclasses.replace(base, vocab_multiple=16)
    model = bigs_jax.build(padded)
    mesh = partitioning.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(partitioning.DEFAULT_RULES):
        fresh = jax.device_put(nnx.to_pure_dict(nnx.state(model)), jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        params, report = checkpointing.restore_matching(str(tmp_path / "ours"), fresh)
    assert "new: none" in report
    word = np.asarray(params["embeddings"]["word"]["embedding"])
    assert word.shape[0] == 64 and not word[V:].any() and word[:V].any()
    assert not np.asarray(params["mlm_head"]["bias"])[V:].any()
    nnx.update(model, params)
    ids, mask, types = batch(V)
    ref = torch_out(model_hf, input_ids=ids, attention_mask=mask, token_type_ids=types)
    logits = np.asarray(model(ids, mask, types).logits)
    assert np.abs(logits[..., :V] - ref.logits.numpy()).max() < 1e-4
    np.testing.assert_array_equal(logits[..., V:], PAD_LOGIT)


@pytest.mark.slow  # three generate compiles, ~17 s on a busy 2-core machine
def test_generation_never_picks_a_pad_id():
    """A padded GPT-2 whose unmasked pad logits would win everywhere (final LN output b, pad
    columns of the head 100·b): greedy, sampled and beam continuations hold real ids only."""
    model = bigs_jax.create("gpt2-tiny", vocab_size=5, vocab_multiple=64,
                            tie_word_embeddings=False)
    b = np.random.default_rng(0).normal(size=model.config.hidden_size).astype(np.float32)
    model.final_norm.scale[...] = np.zeros_like(b)
    model.final_norm.bias[...] = b
    kernel = np.array(model.lm_head.kernel[...])
    kernel[:, 5:] = 100 * b[:, None]
    model.lm_head.kernel[...] = kernel
    logits = np.asarray(model(np.array([[1, 2, 3]])).logits)
    assert logits.shape[-1] == 64 and (logits[..., 5:] == PAD_LOGIT).all()
    prompts = np.array([[1, 2, 3], [4, 0, 1]])
    for kw in (dict(), dict(do_sample=True, temperature=5.0, key=0), dict(num_beams=3)):
        out = np.asarray(bigs_jax.generate(model, prompts, max_new_tokens=12, **kw))
        assert out.shape == (2, 15) and out.max() < 5, kw
