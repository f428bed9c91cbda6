"""Byte-level BPE (GPT-2 vocab.json + merges.txt): ids equal HF GPT2TokenizerFast on ~40k real
lines and hard cases, decode inverts encode, and the tf.data path equals the Python one.

No GPT-2 tokenizer can be downloaded here: a byte-level BPE is trained on ../shared/data text
with `tokenizers` (the library the vocabulary runs on) and saved in GPT-2's file layout."""

import os

import pytest
import tensorflow as tf

from bigs_jax.data import tasks
from bigs_jax.data.bpe import END_OF_TEXT, ByteLevelBPEVocabulary

transformers = pytest.importorskip("transformers")
from tokenizers import ByteLevelBPETokenizer  # noqa: E402

from tests.shared_data import SHARED_DATA as DATA, shared_data  # noqa: E402
FILES = ["tinyshakespeare/input.txt", "wikitext-2-raw/wiki.test.raw"]
HARD = [
    "", " ", "   ", "\t\n\r\n", "a  b   c    d", "  leading and trailing  ", "\n\n\nx\n",
    "don't can't I'm we'll they've she'd it's O'Neil 'quoted'", "DON'T I'M",
    "3.14159 1,000,000 2024-12-05 007 1e-9 ½ ²³", "Héllo, 東京! Привет мир. مرحبا",
    "emoji 🤗🚀👩‍👩‍👧 flags 🇫🇷 skin 👍🏽", "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "ctrl \x00\x01\x7f chars", "tabs\tand\u2028separators", "<|endoftext|>", "a<|endoftext|>b",
    "combining e\u0301 vs \u00e9", "😀" * 50, "x" * 500,
]


def _real_lines():
    """Every line of the corpora, blank and whitespace-only ones included (~44k)."""
    lines = []
    for name in FILES:
        if (DATA / name).is_file():
            lines += (DATA / name).read_text(encoding="utf-8").split("\n")
    return lines


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    shared_data(FILES[0])
    lines = _real_lines()
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(lines, vocab_size=2000, min_frequency=2,
                                special_tokens=[END_OF_TEXT], show_progress=False)
    out = tmp_path_factory.mktemp("bpe")
    trainer.save_model(str(out))
    assert sorted(os.listdir(out)) == ["merges.txt", "vocab.json"]
    return str(out)


def check_equal_to_hf(bpe_dir, lines):
    ours = ByteLevelBPEVocabulary(bpe_dir)
    hf = transformers.GPT2TokenizerFast(os.path.join(bpe_dir, "vocab.json"),
                                        os.path.join(bpe_dir, "merges.txt"))
    mine = ours.encode_batch(lines)
    theirs = hf(lines)["input_ids"]
    assert [x for x, a, b in zip(lines, mine, theirs, strict=True) if a != b] == []
    assert [x for x, ids in zip(lines, mine) if ours.decode(ids) != x] == []
    assert ours.encode("a<|endoftext|>b")[1] == ours.end_of_text_id == hf.eos_token_id
    return sum(map(len, mine))


def test_ids_equal_gpt2_tokenizer_fast(bpe_dir):
    """Every 8th real line and the hard cases (the full run is the slow test below)."""
    assert check_equal_to_hf(bpe_dir, _real_lines()[::8] + HARD) > 35_000


@pytest.mark.slow
def test_ids_equal_gpt2_tokenizer_fast_all_lines(bpe_dir):
    lines = _real_lines() + HARD
    assert len(lines) >= 40_000
    assert check_equal_to_hf(bpe_dir, lines) > 300_000


def test_tf_path_and_task_spec(bpe_dir):
    ours = tasks.load_vocabulary(os.path.join(bpe_dir, "vocab.json"))
    assert ours == ByteLevelBPEVocabulary(bpe_dir) and ours.vocab_size == 2000
    lines = HARD + _real_lines()[:300]
    ragged = ours.encode_tf(tf.constant(lines)).to_list()
    assert ragged == ours.encode_batch(lines)
    assert ours.encode_tf(tf.constant("Hello there")).numpy().tolist() == ours.encode(
        "Hello there")
    assert ours.decode_tf(tf.constant(ours.encode("to be, or not"))).numpy().decode() == \
        "to be, or not"
    assert ours.special_ids.sep_id == ours.end_of_text_id and ours.special_ids.pad_id == 0
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        ByteLevelBPEVocabulary(os.path.join(bpe_dir, "missing"))
