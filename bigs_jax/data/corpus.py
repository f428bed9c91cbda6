"""The embedded default corpus: English prose from the Python reference documentation.

Every CPython installation ships the text of its language reference as the standard-library
module `pydoc_data.topics` (it backs `help("assert")`). We use it as a pretraining corpus that
needs no download and no user file, so the quickstart and the tests run offline.

- **Documents** are the help topics (one per `topics` key) in sorted topic-name order, minus
  those whose text is a verbatim section of a larger topic ('if', 'try', 'class', ... are
  sections of 'compound'; 'customization', 'sequence-types', ... of 'specialnames'): keeping
  them would count a fifth of the text twice and leak held-out text into 'train'. 57 of the
  79 topics remain. Each is cleaned lightly and made one line: reStructuredText heading
  underlines (`*****`, `=====`, `-----`, `~~~~~`) are dropped and every whitespace run becomes
  one space. Code samples lose their layout; the prose, which is most of the text, reads
  unchanged. Paragraph breaks are not kept: the pipeline concatenates documents into
  fixed-length rows anyway.
- **Split**: a topic is held out for 'validation' when `sha256(topic name) mod 10 == 0`, so
  membership depends only on the name (stable across Python versions that add or drop topics);
  every other topic is 'train'.
- **Size** under CPython 3.11.7 (`REFERENCE_FINGERPRINT`; other versions differ by a few
  percent): 57 documents, 343,902 characters, 52,503 words (whitespace split), 81,599 tokens
  under the embedded vocabulary (`bigs_jax.data.vocab`, byte-level BPE, 4,096 ids). Before
  removing the duplicated sections, `pydoc_data.topics` holds 464,970 characters.

  | split      | documents | characters | words  | tokens | rows at L=128 (MLM / LM) |
  |------------|-----------|------------|--------|--------|--------------------------|
  | train      | 49        | 310,003    | 47,481 | 72,296 | 575 / 561                |
  | validation | 8         | 33,899     | 5,022  | 9,303  | 74 / 73                  |

  Token counts exclude the [SEP] the preprocessors put after each document. The validation
  topics are dict, floating, raise, return, slicings, specialattrs, string-methods and
  typesmodules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

SPLITS = ("train", "validation")

# sha256 of the cleaned documents of both splits under CPython 3.11.7 (see `fingerprint`). Tests
# compare exact sizes only when the running interpreter ships this same text.
REFERENCE_FINGERPRINT = "f02de262e6ec48f4850a8b2a8fd8f8fccb4b0e6862e841bdfa9321a76a9f2209"

_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: a help topic of the Python reference."""

    name: str
    text: str


def _topics() -> dict[str, str]:
    try:
        from pydoc_data import topics  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise FileNotFoundError(
            "The embedded corpus reads the standard-library module pydoc_data, which this "
            "Python installation lacks (some distros strip it); install a complete CPython "
            "(python.org, conda, uv, or your distro's full python3 package)."
        ) from e
    return dict(topics.topics)


def _clean(text: str) -> str:
    lines = [line for line in text.split("\n") if not _UNDERLINE.match(line)]
    return " ".join(" ".join(lines).split())


def _is_section_of_another(name: str, texts: dict[str, str]) -> bool:
    # Identical texts: the first name (sorted) stays.
    return any(
        other != name
        and texts[name] in texts[other]
        and (len(texts[other]) > len(texts[name]) or other < name)
        for other in texts
    )


@functools.cache
def _all_documents() -> tuple[Document, ...]:
    texts = {name: _clean(text) for name, text in _topics().items()}
    return tuple(
        Document(name, texts[name])
        for name in sorted(texts)
        if not _is_section_of_another(name, texts)
    )


def split_of(topic_name: str) -> str:
    """Returns the split ('train' or 'validation') a topic belongs to."""
    digest = hashlib.sha256(topic_name.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest, "big") % 10 == 0 else "train"


def documents(split: str) -> list[Document]:
    """Returns the cleaned documents of one split, sorted by topic name.

    Args:
        split: 'train' or 'validation'.

    Returns:
        The split's documents; the order is fixed, so every pipeline built on it is
        deterministic.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} of the embedded corpus; use one of {SPLITS}.")
    return [doc for doc in _all_documents() if split_of(doc.name) == split]


def fingerprint() -> str:
    """sha256 of this interpreter's cleaned corpus, to tell which Python's text is in use."""
    h = hashlib.sha256()
    for split in SPLITS:
        for doc in documents(split):
            h.update(f"{split}\0{doc.name}\0{doc.text}\0".encode())
    return h.hexdigest()
