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
  lib2to3 and the demos are left out, and so are files whose text is a verbatim part of
  another's. The parse is cached in `~/.cache/bigs_jax/` (keyed by interpreter version and
  file stamps).

Each document is cleaned lightly and made one line: reStructuredText heading underlines
(`*****`, `=====`, ...) are dropped and every whitespace run becomes one space. Code samples
lose their layout; the prose, which is most of the text, reads unchanged.

- **Split**: a document is held out for 'validation' when `sha256(name) mod 10 == 0`, so
  membership depends only on the name (stable across Python versions that add or drop text).
- **Size** under CPython 3.11.7 (`REFERENCE_FINGERPRINT`; other versions differ by a few
  percent): 535 documents, 1,802,211 characters, 284,489 words (whitespace split), 419,747
  tokens under the embedded vocabulary (`bigs_jax.data.vocab`, byte-level BPE, 8,192 ids).

  | split      | documents (topics) | characters | words   | tokens  | rows at L=128 (MLM / LM) |
  |------------|--------------------|------------|---------|---------|--------------------------|
  | train      | 479 (49)           | 1,582,367  | 249,298 | 366,737 | 2,915 / 2,847            |
  | validation | 56 (8)             | 219,844    | 35,191  | 53,010  | 422 / 412                |

  Token counts exclude the [SEP] the preprocessors put after each document. The held-out
  reference topics are dict, floating, raise, return, slicings, specialattrs, string-methods
  and typesmodules.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import sysconfig

SPLITS = ("train", "validation")

# sha256 of the cleaned documents of both splits under CPython 3.11.7 (see `fingerprint`). Tests
# compare exact sizes only when the running interpreter ships this same text.
REFERENCE_FINGERPRINT = "8e0ad1136d4e17e15563828f38477a18cae76d1fcefe3d74ab2a25d358a0d5c0"

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
    # Identical texts: the first name (sorted) stays. A short probe is searched first: the full
    # containment test of every pair would cost seconds at every start.
    text = texts[name]
    probe = text[:64]
    return any(
        other != name
        and len(texts[other]) >= len(text)
        and probe in texts[other]
        and text in texts[other]
        and (len(texts[other]) > len(text) or other < name)
        for other in texts
    )


# Standard-library folders whose docstrings are not the library's own documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "pydoc_data"}
_MIN_DOCSTRING_WORDS = 8
_CACHE_FORMAT = 1
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def _module_docstrings() -> dict[str, str]:
    """`_parse_module_docstrings`, cached on disk: parsing ~600 files costs seconds per start.

    The cache key covers the interpreter version and every file's path, size and mtime, so an
    upgraded standard library is read afresh. A cache that cannot be written is skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    stamp = hashlib.sha256(f"{sys.version}\0{root}\0{_CACHE_FORMAT}".encode())
    for path in _stdlib_files(root):
        st = os.stat(path)
        stamp.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "bigs_jax")
    cache = os.path.join(cache_dir, f"stdlib-docstrings-{stamp.hexdigest()[:16]}.json")
    try:
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    out = _parse_module_docstrings(root)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f)
        os.replace(tmp, cache)
    except OSError:
        pass
    return out


def _stdlib_files(root: str) -> list[str]:
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return paths


def _parse_module_docstrings(root: str) -> dict[str, str]:
    """{'stdlib:json/decoder.py': its docstrings joined} for every standard-library module.

    Files are parsed with `ast`, never imported (importing all of the standard library has side
    effects). Doctest lines are dropped; docstrings shorter than 8 words (mostly "Return x.")
    carry little language and are skipped.
    """
    out = {}
    for path in _stdlib_files(root):
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
                    parts.append("\n".join(l for l in doc.split("\n") if not _DOCTEST.match(l)))
        if parts:
            out["stdlib:" + os.path.relpath(path, root).replace(os.sep, "/")] = "\n\n".join(parts)
    return out


@functools.cache
def _all_documents() -> tuple[Document, ...]:
    topics = {name: _clean(text) for name, text in _topics().items()}
    modules = {name: _clean(text) for name, text in _module_docstrings().items()}
    texts = {**topics, **{k: v for k, v in modules.items() if v}}
    # A text that is a verbatim part of another (a topic inside a larger topic, a module that
    # re-exports another's documented classes) would be counted twice and could leak across
    # the split.
    keep = [name for name in [*sorted(topics), *sorted(modules)]
            if name in texts and not _is_section_of_another(name, texts)]
    return tuple(Document(name, texts[name]) for name in keep)


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
