"""The embedded SentencePiece vocabulary: ids, size, round trips, reproducible build."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from bigs_jax.data import corpus, vocab

SAME_TEXT = corpus.fingerprint() == corpus.REFERENCE_FINGERPRINT
DOCUMENTED_TOKENS = {"train": 366_737, "validation": 53_010}  # corpus docstring


def test_special_ids_and_size_match_the_model_file():
    ids = vocab.embedded_special_ids()
    assert (ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id) == (0, 1, 2, 3, 4)
    sp = spm.SentencePieceProcessor(model_file=str(vocab.EMBEDDED_MODEL_PATH))
    assert ids.vocab_size == sp.get_piece_size() == vocab.EMBEDDED_VOCAB_SIZE == 8192
    assert [sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert sp.id_to_piece(5) == "<0x00>" and sp.id_to_piece(260) == "<0xFF>"
    seqio_vocab = vocab.embedded_vocabulary()
    assert seqio_vocab.vocab_size == 8192
    assert vocab.special_ids(seqio_vocab) == ids


def test_round_trip_on_corpus_text_in_python_and_in_tf():
    sv = vocab.embedded_vocabulary()
    texts = [d.text for d in corpus.documents("validation")] + [
        d.text[:2000] for d in corpus.documents("train")[::7]
    ]
    for text in texts:
        ids = sv.encode(text)
        assert min(ids) > 4  # no special id, no [UNK]
        assert sv.decode(ids) == text
    tf_ids = sv.encode_tf(texts[0]).numpy()
    np.testing.assert_array_equal(tf_ids, sv.encode(texts[0]))
    assert sv.decode_tf(tf_ids).numpy().decode("utf-8") == texts[0]


def test_any_text_encodes_without_unk_and_specials_behave():
    sv = vocab.embedded_vocabulary()
    text = "naïve café 東京 🙂 [MASK] x\ty"
    ids = sv.encode(text)
    assert vocab.embedded_special_ids().unk_id not in ids
    assert sv.decode(ids) == text
    assert ids.count(4) == 1  # "[MASK]" in text is the mask token (user-defined piece)
    assert 2 not in sv.encode("[CLS] [SEP]") and 3 not in sv.encode("[CLS] [SEP]")
    assert sv.decode([2, *sv.encode("hello world"), 3, 0, 0]) == "hello world"


@pytest.mark.skipif(not SAME_TEXT, reason="this Python ships other reference text")
def test_token_counts_match_the_corpus_docstring():
    sv = vocab.embedded_vocabulary()
    for split, expected in DOCUMENTED_TOKENS.items():
        assert sum(len(sv.encode(d.text)) for d in corpus.documents(split)) == expected


@pytest.mark.skipif(not SAME_TEXT, reason="the asset was built from CPython 3.11.7's text")
def test_rebuild_is_bit_identical_to_the_shipped_asset():
    assert vocab.train_embedded_model() == vocab.EMBEDDED_MODEL_PATH.read_bytes()


def test_user_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab.sentencepiece_vocabulary(tmp_path / "missing.model")
    model = io.BytesIO()
    text = [d.text for d in corpus.documents("validation")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
        num_threads=1,
    )
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"no \[CLS\] piece"):
        vocab.sentencepiece_vocabulary(path)


def test_user_model_with_specials_is_accepted(tmp_path):
    model = io.BytesIO()
    text = [d.text for d in corpus.documents("validation")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
        num_threads=1,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        control_symbols=["<cls>", "<sep>"],
        user_defined_symbols=["<mask>"],
    )
    path = tmp_path / "user.model"
    path.write_bytes(model.getvalue())
    ids = vocab.special_ids(vocab.sentencepiece_vocabulary(path))
    assert (ids.pad_id, ids.unk_id, ids.cls_id, ids.sep_id, ids.mask_id) == (0, 1, 2, 3, 4)
    assert ids.vocab_size == 300
