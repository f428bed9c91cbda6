"""The embedded corpus: split, order and the sizes its docstring documents."""

import sys

import pytest

from bigs_jax.data import corpus

# The figures of the corpus docstring (CPython 3.11.7 text).
DOCUMENTED = {"train": (479, 1_582_367, 249_298), "validation": (56, 219_844, 35_191)}
VALIDATION_TOPICS = [
    "dict",
    "floating",
    "raise",
    "return",
    "slicings",
    "specialattrs",
    "string-methods",
    "typesmodules",
]
SAME_TEXT = corpus.fingerprint() == corpus.REFERENCE_FINGERPRINT


def _sizes(split):
    docs = corpus.documents(split)
    return len(docs), sum(len(d.text) for d in docs), sum(len(d.text.split()) for d in docs)


def test_splits_are_disjoint_and_cover_every_topic_but_duplicated_sections():
    from pydoc_data import topics

    train = [d.name for d in corpus.documents("train")]
    validation = [d.name for d in corpus.documents("validation")]
    assert not set(train) & set(validation)
    for names in (train, validation):  # topics first, then library files, each sorted
        help_topics = [n for n in names if not n.startswith("stdlib:")]
        files = [n for n in names if n.startswith("stdlib:")]
        assert names == help_topics + files
        assert help_topics == sorted(help_topics) and files == sorted(files)
    assert all(corpus.split_of(name) == "validation" for name in validation)
    # ~10% of the documents and of the text held out, by name only.
    assert 0.05 <= len(validation) / (len(train) + len(validation)) <= 0.2
    assert 0.05 <= _sizes("validation")[1] / (_sizes("train")[1] + _sizes("validation")[1]) < 0.2
    dropped = set(topics.topics) - set(train) - set(validation)
    modules = [n for n in train + validation if n.startswith("stdlib:")]
    assert "stdlib:json/decoder.py" in modules and len(modules) > 400
    assert {"if", "try", "customization", "sequence-types"} <= dropped
    texts = [d.text for d in corpus.documents("train") + corpus.documents("validation")]
    for name in dropped:  # each dropped topic survives inside a kept one
        assert any(corpus._clean(topics.topics[name]) in t for t in texts), name


def test_no_document_is_contained_in_another():
    docs = corpus.documents("train") + corpus.documents("validation")
    for a in docs:
        assert not [b.name for b in docs if b is not a and a.text in b.text], a.name


def test_documented_validation_topics_are_held_out_by_name():
    # Holds on any Python: membership depends on the topic name alone.
    assert [n for n in VALIDATION_TOPICS if corpus.split_of(n) != "validation"] == []
    assert corpus.split_of("assert") == "train"


@pytest.mark.skipif(not SAME_TEXT, reason="this Python ships other reference text")
def test_sizes_match_the_docstring_exactly():
    for split, expected in DOCUMENTED.items():
        assert _sizes(split) == expected, split
    assert [d.name for d in corpus.documents("validation")
            if not d.name.startswith("stdlib:")] == VALIDATION_TOPICS


def test_sizes_are_close_to_the_docstring_on_any_python():
    for split, (_, chars, words) in DOCUMENTED.items():
        _, got_chars, got_words = _sizes(split)
        assert abs(got_chars / chars - 1) < 0.25, split
        assert abs(got_words / words - 1) < 0.25, split


def test_documents_are_cleaned_single_lines():
    for doc in corpus.documents("train"):
        assert "\n" not in doc.text and "  " not in doc.text
        assert doc.text == doc.text.strip()
    # The title's ***** underline is dropped.
    assert corpus.documents("train")[0].text.startswith('The "assert" statement Assert statements')


def test_unknown_split_and_missing_pydoc_data_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        corpus.documents("test")
    monkeypatch.setitem(sys.modules, "pydoc_data", None)  # makes the import fail
    monkeypatch.setattr(corpus, "_all_documents", corpus._all_documents.__wrapped__)
    with pytest.raises(FileNotFoundError, match="pydoc_data.*complete CPython"):
        corpus.documents("train")
