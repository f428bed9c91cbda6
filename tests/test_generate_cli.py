"""`python -m bigs_jax.generate WORKDIR --prompt ...` on a converted HF GPT-2 that carries its
byte-level BPE tokenizer: the printed text is the API's continuation decoded by that tokenizer;
mistakes end with one `error:` line."""

import os
import subprocess
import sys

import pytest

import bigs_jax
from bigs_jax import cli_generate
from bigs_jax.convert.common import convert
from bigs_jax.data.bpe import END_OF_TEXT, ByteLevelBPEVocabulary
from tests.convert.tiny_hf import save_tiny, transformers as tr
from tests.runs import ROOT
from tests.shared_data import shared_data

from tokenizers import ByteLevelBPETokenizer  # noqa: E402



@pytest.fixture(scope="module")
def gpt2_workdir(tmp_path_factory):
    path = shared_data("tinyshakespeare", "input.txt")
    root = tmp_path_factory.mktemp("cli")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(path.read_text().split("\n")[:4000], vocab_size=300,
                                special_tokens=[END_OF_TEXT], show_progress=False)
    trainer.save_model(str(hf_dir))
    config = tr.GPT2Config(vocab_size=300, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    save_tiny(tr.GPT2LMHeadModel, config, str(hf_dir))
    convert(str(hf_dir), str(root / "ours"))
    return str(root / "ours")


def api_text(gpt2_workdir, prompt):
    assert sorted(os.listdir(os.path.join(gpt2_workdir, "tokenizer"))) == ["merges.txt",
                                                                          "vocab.json"]
    vocab = ByteLevelBPEVocabulary(os.path.join(gpt2_workdir, "tokenizer"))
    ids = vocab.encode(prompt)
    out = bigs_jax.generate(bigs_jax.load(gpt2_workdir), [ids], max_new_tokens=7, num_beams=2,
                            eos_id=vocab.end_of_text_id, return_dict=True)
    return prompt + vocab.decode(out.tolist(eos_id=vocab.end_of_text_id)[0])


ARGS = ["--max_new_tokens", "7", "--num_beams", "2"]


def test_cli_prints_the_api_continuation(gpt2_workdir, capsys):
    prompt = "First Citizen: speak"
    assert cli_generate.main([gpt2_workdir, "--prompt", prompt, *ARGS]) == 0
    assert capsys.readouterr().out == api_text(gpt2_workdir, prompt) + "\n"


@pytest.mark.slow
def test_python_m_entry_point(gpt2_workdir):
    prompt = "First Citizen: speak"
    run = subprocess.run([sys.executable, "-m", "bigs_jax.generate", gpt2_workdir, "--prompt",
                          prompt, *ARGS], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == api_text(gpt2_workdir, prompt) + "\n"


def test_cli_errors_are_one_line(gpt2_workdir, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        ([gpt2_workdir, "--prompt", "x", "--top_p", "0"], "top_p"),
        # 0 is a temperature no sampler can use, not "the default" (it once sampled at 1.0)
        ([gpt2_workdir, "--prompt", "x", "--temperature", "0"], "temperature must be > 0, "
                                                                "got 0.0"),
        ([gpt2_workdir, "--prompt", "x", "--vocab", str(tmp_path / "no.json")], "merges.txt"),
    ]
    for argv, message in cases:
        assert cli_generate.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
