"""bigs_jax workdirs → the official BiGS and M2-BERT layouts (`--to bigs-official`,
`--to m2-official`): exact round trips, the exact tensor layout the import tests build for
official checkpoints, and the official forward passes (tests/reference/bigs_numpy.py and
test_m2_official's numpy transcription) on the exported files."""

import json
import os

import numpy as np
import pytest
from flax import nnx, serialization

import bigs_jax
from bigs_jax.convert.__main__ import main as cli
from bigs_jax.convert.common import EXPORT_PAIRS, ConversionError, convert
from bigs_jax.models import make_config
from bigs_jax.models.encoder import EncoderConfig
from bigs_jax.models.m2 import M2Config
from bigs_jax.paths import flat_paths
from bigs_jax.train import checkpointing
from tests.convert import test_bigs_official as bigs
from tests.convert import test_m2_official as m2
from tests.reference.bigs_numpy import bigs_mlm_forward

torch = m2.torch


def workdir(path, config, seed=0, params=True):
    """A workdir holding a random model of `config` (only model.json with params=False)."""
    path = str(path)
    os.makedirs(path)
    if params:
        state = nnx.to_pure_dict(nnx.state(bigs_jax.build(config, seed=seed)))
        checkpointing.save_params_only(path, 0, state)
    checkpointing.write_json_atomic(os.path.join(path, checkpointing.MODEL_JSON),
                                    checkpointing.model_json(config))
    return path


def params_of(path):
    return {k: np.asarray(v) for k, v in
            flat_paths(nnx.to_pure_dict(nnx.state(bigs_jax.load(path)))).items()}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def read_msgpack(path):
    with open(os.path.join(path, "flax_model.msgpack"), "rb") as f:
        return serialization.msgpack_restore(f.read())


# ---------------------------------------------------------------------------- BiGS


@pytest.mark.parametrize("labels", [0, 3])
def test_bigs_round_trip_is_exact(tmp_path, labels):
    """official → ours → official reproduces every official tensor bit for bit (same names,
    shapes, dtype float32); ours → official → ours reproduces our params and config."""
    tree = bigs.official_tree(classifier_labels=labels)
    config = {**bigs.CONFIG, "pooler_type": "mean"} if labels else bigs.CONFIG
    src = bigs.write_flax(tmp_path / "official", tree, config)
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert cli([src, a]) == 0
    assert cli([a, b, "--to", "bigs-official"]) == 0
    exported = flat_paths(read_msgpack(b))
    original = flat_paths(tree)
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        assert exported[k].dtype == np.float32 and np.array_equal(exported[k], v), k
    with open(os.path.join(b, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == "BiGS" and written["architectures"] == [
        "FlaxBiGSForSequenceClassification" if labels else "FlaxBiGSForMaskedLM"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_ssm", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                "pre_norm", "hidden_dropout_prob", "initializer_range"):
        assert written[key] == bigs.CONFIG[key], key
    assert cli([b, c]) == 0
    assert_same_params(a, c)
    assert bigs_jax.load(a).config == bigs_jax.load(c).config


def test_bigs_export_matches_official_forward(tmp_path):
    """A randomly initialized bigs_jax BiGS (not an imported one), exported: the official
    forward (numpy reference, official padding) on the exported msgpack equals ours."""
    config = EncoderConfig(block="gated", mixer="ssm", vocab_size=bigs.V, max_len=bigs.L,
                           hidden_size=bigs.D, num_layers=bigs.LAYERS, intermediate_size=bigs.F,
                           ssm_state=bigs.N, official_padding=True)
    src = workdir(tmp_path / "ours", config, seed=3)
    dst = str(tmp_path / "official")
    assert cli([src, dst, "--to", "bigs-official"]) == 0
    tree = read_msgpack(dst)
    assert {k: v.shape for k, v in flat_paths(tree).items()} == {
        k: v.shape for k, v in flat_paths(bigs.official_tree()).items()}
    ids, mask = bigs.padded_ids()
    h_ref, logits_ref = bigs_mlm_forward(tree, ids)
    out = bigs_jax.load(src)(ids, mask)
    err_h = np.abs(np.asarray(out.hidden_states) - h_ref).max()
    err_l = np.abs(np.asarray(out.logits) - logits_ref).max()
    assert err_h < 1e-5 and err_l < 1e-5, (err_h, err_l)


# ---------------------------------------------------------------------------- M2


def _official_m2(head, positions=True):
    sd = m2.official_state(legacy=head == "mlm", head="mlm" if head == "mlm" else "pooler",
                           positions=positions)
    if not positions:  # the official BertEmbeddings registers position_ids only with them
        del sd["bert.embeddings.position_ids"]
    if head == "classification":
        rng = np.random.default_rng(5)
        sd["classifier.weight"] = rng.standard_normal((3, m2.H)).astype(np.float32)
        sd["classifier.bias"] = rng.standard_normal(3).astype(np.float32)
    return sd


@pytest.mark.parametrize("head,positions", [("mlm", True), ("pooler", True),
                                            ("classification", True), ("mlm", False)])
def test_m2_round_trip_is_exact(tmp_path, head, positions):
    """official state dict → ours → official: the same keys (buffers and aliases included),
    shapes and dtypes, parameters bit for bit, aliases sharing one storage as torch saves
    them; ours → official → ours: the same params and config."""
    sd = _official_m2(head, positions)
    src = tmp_path / "official"
    src.mkdir()
    m2._save_bin(sd, src / "pytorch_model.bin")
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert cli([str(src), a, "--from", "m2-official"]) == 0
    assert bigs_jax.load(a).config.head == head
    assert cli([a, b, "--to", "m2-official"]) == 0
    out = torch.load(os.path.join(b, "pytorch_model.bin"), weights_only=True)
    assert sorted(out) == sorted(sd)
    for k, v in sd.items():
        got = out[k].numpy()
        assert got.shape == v.shape and got.dtype == v.dtype, k
        if k.endswith(("pos_emb.t", "modulation.deltas")):  # buffers, as torch builds them
            np.testing.assert_allclose(got, v, rtol=1e-6, atol=1e-7)
        else:
            assert np.array_equal(got, v), k
    f = "bert.encoder.layer.1.attention.filter_fn2"
    assert torch.equal(out[f"{f}.pos_emb.t"], torch.linspace(0, 1, m2.L)[None, :, None])
    assert torch.equal(out[f"{f}.modulation.deltas"], torch.linspace(
        np.log(1e-2) / 1.5, np.log(1e-2) / 0.3, m2.H)[None, None])
    assert out[f"{f}.implicit_filter_rev.5.freq"].data_ptr() == out[
        f"{f}.implicit_filter.1.freq"].data_ptr()
    assert out[f"{f}.pos_emb.t"].data_ptr() != out[
        "bert.encoder.layer.0.attention.filter_fn.pos_emb.t"].data_ptr()  # one per module
    if head == "mlm":
        assert out["cls.predictions.decoder.weight"].data_ptr() == out[
            "bert.embeddings.word_embeddings.weight"].data_ptr()
    with open(os.path.join(b, "config.json")) as fh:
        written = json.load(fh)
    assert (written["model_type"], written["hyena_training_additions"],
            written["long_conv_l_max"], written["monarch_mlp_nblocks"]) == (
        "m2_bert", head == "mlm", m2.L, 4)
    assert cli([b, c]) == 0
    assert_same_params(a, c)
    assert bigs_jax.load(a).config == bigs_jax.load(c).config


def test_m2_export_matches_official_forward(tmp_path):
    """A randomly initialized bigs_jax M2-BERT, exported: the official forward (numpy
    transcription of bert_layers.py) on the exported state dict equals ours."""
    config = M2Config(vocab_size=m2.V, max_len=m2.L, hidden_size=m2.H, num_layers=m2.LAYERS,
                      intermediate_size=m2.I, filter_order=m2.ORDER, mixer_norm=True,
                      pooler="non_padding_mean", head="mlm")
    src = workdir(tmp_path / "ours", config, seed=1)
    dst = str(tmp_path / "official")
    assert cli([src, dst, "--to", "m2-official"]) == 0
    sd = {k: v.numpy() for k, v in
          torch.load(os.path.join(dst, "pytorch_model.bin"), weights_only=True).items()}
    assert {k: v.shape for k, v in sd.items()} == {
        k: v.shape for k, v in m2.official_state(legacy=True).items()}
    ids = np.random.default_rng(2).integers(0, m2.V, (2, m2.L))
    ref = m2.official_forward(sd, ids, legacy=True)
    err = np.abs(np.asarray(bigs_jax.load(src)(ids).hidden_states) - ref).max()
    assert err < 1e-4, err


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("to,config,message", [
    ("bigs-official", make_config("gpt2-tiny"), "--to bigs-official cannot hold the 'gpt2' "
     "family; supported pairs: " + EXPORT_PAIRS),
    ("m2-official", make_config("bigs-tiny"), "--to m2-official cannot hold the 'encoder' "
     "family"),
    ("hf", make_config("m2-bert-tiny"), "--to hf cannot hold the 'm2' family"),
    ("bigs-official", make_config("bert-tiny"), "no official BiGS equivalent: "
     "block='stack', mixer='attention' (needs gated+ssm)"),
    ("bigs-official", make_config("bigs-tiny", head="none"), "head='none'"),
    ("m2-official", make_config("m2-gpt-tiny"), "causal=True (M2-GPT has no official"),
    ("m2-official", make_config("m2-bert-tiny", short_conv_size=4), "short_conv_size=4"),
    ("onnx", make_config("bigs-tiny"), "unknown --to 'onnx'; supported --to formats and the "
     "model families each holds: " + EXPORT_PAIRS),
])
def test_export_refusals_are_one_line(tmp_path, capsys, to, config, message):
    src = workdir(tmp_path / "src", config, params=False)
    assert cli([src, str(tmp_path / "out"), "--to", to]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_export_needs_a_workdir(tmp_path):
    src = bigs.write_flax(tmp_path / "official", bigs.official_tree())
    with pytest.raises(ConversionError, match="is not a bigs_jax workdir .* --to bigs first"):
        convert(src, str(tmp_path / "out"), to="bigs-official")
    assert not os.path.exists(tmp_path / "out")
