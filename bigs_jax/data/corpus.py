"""The embedded default corpus: English prose from the Python documentation every CPython ships.

Two kinds of text that every CPython installation carries, read at run time, so the quickstart
and the tests need no download and no user file:

- **Reference topics**: the text of the language reference as the standard-library module
  `pydoc_data.topics` (it backs `help("assert")`), one document per help topic, in sorted
  topic-name order, minus those whose text is a verbatim section of a larger topic ('if',
  'try', 'class', ... are sections of 'compound'; 'customization', 'sequence-types', ... of
  'specialnames'): keeping them would count a fifth of that text twice and leak held-out text
  into 'train'. 57 of the 79 topics remain.
- **Library docstrings**: the docstrings of every standard-library module, class and function,
  one document per source file (`stdlib:json/decoder.py`), read with `ast` (never imported),
  without doctest lines and without docstrings of fewer than 8 words; test suites, IDLE,
  lib2to3 and the demos are left out.

Each document is cleaned lightly and made one line: reStructuredText heading underlines
(`*****`, `=====`, ...) are dropped and every whitespace run becomes one space. Code samples
lose their layout; the prose, which is most of the text, reads unchanged.

- **Split**: a document is held out for 'validation' when `sha256(name) mod 10 == 0`, so
  membership depends only on the name (stable across Python versions that add or drop text).
- **Size** under CPython 3.11.7 (`REFERENCE_FINGERPRINT`; other versions differ by a few
  percent): 537 documents, 1,802,346 characters, 284,510 words (whitespace split), 419,780
  tokens under the embedded vocabulary (`bigs_jax.data.vocab`, byte-level BPE, 8,192 ids).

  | split      | documents (topics) | characters | words   | tokens  | rows at L=128 (MLM / LM) |
  |------------|--------------------|------------|---------|---------|--------------------------|
  | train      | 481 (49)           | 1,582,502  | 249,319 | 366,764 | 2,915 / 2,847            |
  | validation | 56 (8)             | 219,844    | 35,191  | 53,016  | 422 / 412                |

  Token counts exclude the [SEP] the preprocessors put after each document. The held-out
  reference topics are dict, floating, raise, return, slicings, specialattrs, string-methods
  and typesmodules.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import re
import sysconfig

SPLITS = ("train", "validation")

# sha256 of the cleaned documents of both splits under CPython 3.11.7 (see `fingerprint`). Tests
# compare exact sizes only when the running interpreter ships this same text.
REFERENCE_FINGERPRINT = "708a7fd7915b11766b9bd7dbdcab86761c4fd44c2907283146aa989d9bdc28d9"

_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document: a help topic, or the docstrings of one library source file."""

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


# Standard-library folders whose docstrings are not the library's own documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "pydoc_data"}
_MIN_DOCSTRING_WORDS = 8
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def _module_docstrings() -> dict[str, str]:
    """{'stdlib:json/decoder.py': its docstrings joined} for every standard-library module.

    Files are parsed with `ast`, never imported (importing all of the standard library has side
    effects). Doctest lines are dropped; docstrings shorter than 8 words (mostly "Return x.")
    carry little language and are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or Python-2 fixtures
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= _MIN_DOCSTRING_WORDS:
                        parts.append("\n".join(l for l in doc.split("\n")
                                               if not _DOCTEST.match(l)))
            if parts:
                out["stdlib:" + os.path.relpath(path, root).replace(os.sep, "/")] = \
                    "\n\n".join(parts)
    return out


@functools.cache
def _all_documents() -> tuple[Document, ...]:
    texts = {name: _clean(text) for name, text in _topics().items()}
    topics = [Document(name, texts[name]) for name in sorted(texts)
              if not _is_section_of_another(name, texts)]
    modules = [Document(name, _clean(text)) for name, text in
               sorted(_module_docstrings().items())]
    return tuple(topics + [doc for doc in modules if doc.text])


def split_of(topic_name: str) -> str:
    """Returns the split ('train' or 'validation') a document belongs to, by its name."""
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
