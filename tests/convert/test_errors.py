"""Wrong sources fail with one clear error and leave nothing at DST."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bigs_jax.convert.common import ConversionError, convert, read_safetensors
from tests.convert.tiny_hf import save_tiny
from tests.convert.tiny_hf import transformers as tr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    save_tiny(tr.GPT2LMHeadModel, tr.GPT2Config(vocab_size=61, n_embd=24, n_layer=2, n_head=2,
                                                n_positions=32), str(base / "gpt2"))
    save_tiny(tr.BertForMaskedLM, tr.BertConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32), str(base / "bert"))
    return base


def fails(src, dst, match, **kw):
    """The conversion raises one ConversionError matching `match` and leaves no trace."""
    with pytest.raises(ConversionError, match=match) as info:
        convert(str(src), str(dst), **kw)
    assert not os.path.exists(dst)
    assert not [n for n in os.listdir(os.path.dirname(dst)) if ".tmp-" in n]
    return str(info.value)


def copy(src, dst, skip=()):
    os.makedirs(dst)
    for n in os.listdir(src):
        if n not in skip:
            shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    return dst


def test_forcing_the_bert_map_on_gpt2(tiny_dirs, tmp_path):
    fails(tiny_dirs / "gpt2", tmp_path / "out", "model_type 'gpt2', not 'bert'",
          from_="hf-bert")
    fails(tiny_dirs / "gpt2", tmp_path / "out", "model_type 'gpt2', not 'BiGS'",
          from_="bigs-official")


def test_gpt2_weights_under_a_bert_config_list_every_key(tiny_dirs, tmp_path):
    src = copy(tiny_dirs / "gpt2", tmp_path / "mixed", skip=("config.json",))
    shutil.copy(tiny_dirs / "bert" / "config.json", os.path.join(src, "config.json"))
    msg = fails(src, tmp_path / "out", "does not match")
    lines = msg.splitlines()
    assert sum(line.startswith("  missing: ") for line in lines) == 42  # every BERT tensor
    assert sum(line.startswith("  unexpected: ") for line in lines) == 28  # every GPT-2 one
    assert "  missing: encoder.layer.1.output.LayerNorm.weight (for layers/1/mlp_norm/scale)" \
        in lines
    assert "  unexpected: transformer.h.0.attn.c_attn.weight (24, 72)" in lines


def test_mis_shaped_tensor(tiny_dirs, tmp_path):
    from safetensors.numpy import save_file

    src = copy(tiny_dirs / "bert", tmp_path / "bad")
    path = os.path.join(src, "model.safetensors")
    tensors = read_safetensors(path)
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((41, 24), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    msg = fails(src, tmp_path / "out", r"\(1 mis-shaped\)")
    assert ("  mis-shaped: encoder.layer.1.intermediate.dense.weight: (24, 41) as "
            "layers/1/mlp/up/kernel, expected (24, 40)") in msg.splitlines()


def test_truncated_safetensors_via_cli(tiny_dirs, tmp_path):
    src = copy(tiny_dirs / "bert", tmp_path / "cut")
    path = os.path.join(src, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    dst = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bigs_jax.convert", src, str(dst)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("error: ") and "truncated" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not os.path.exists(dst)


def test_missing_config_json(tiny_dirs, tmp_path):
    src = copy(tiny_dirs / "bert", tmp_path / "noconfig", skip=("config.json",))
    fails(src, tmp_path / "out", "cannot tell the format")
    fails(src, tmp_path / "out", "config.json not found", from_="hf-bert")


def test_destination_must_not_exist(tiny_dirs, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(str(tiny_dirs / "bert"), str(dst))
    assert os.listdir(dst) == ["keep.txt"]


def test_a_bucket_destination_is_refused_not_made_local(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # os.path.abspath would have written <cwd>/gs:/bucket/out
    with pytest.raises(ConversionError, match=r"^gs://bucket/out: convert writes a local "
                                              r"directory; convert to a local path"):
        convert(str(tiny_dirs / "bert"), "gs://bucket/out")
    assert os.listdir(tmp_path) == []


def test_unsupported_formats_and_flags(tiny_dirs, tmp_path):
    fails(tiny_dirs / "bert", tmp_path / "out", "unknown --from 'not-yet'; choose one of",
          from_="not-yet")
    fails(tiny_dirs / "bert", tmp_path / "out", "applies to bigs-official",
          official_padding=True)
    src = copy(tiny_dirs / "bert", tmp_path / "roberta")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**config, "model_type": "roberta"}, f)
    fails(src, tmp_path / "out", "model_type 'roberta'", from_="hf")


def test_export_refuses_non_bert_encoders(tmp_path):
    import bigs_jax
    from bigs_jax.train import checkpointing

    model = bigs_jax.create("bigs-tiny", vocab_size=61, max_len=16)
    workdir = tmp_path / "bigs"
    workdir.mkdir()
    checkpointing.write_json_atomic(str(workdir / "model.json"),
                                    checkpointing.model_json(model.config))
    fails(workdir, tmp_path / "out", "no HF BERT equivalent: block='gated', mixer='ssm'",
          to="hf")
