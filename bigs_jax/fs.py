"""Workdir paths anywhere `etils.epath` reaches: local directories, gs://, s3://, az://
(a train workdir is local or gs://: Orbax writes its arrays nowhere else, see
`train.workdir.check_workdir`).

Every file of a workdir (config.json, model.json, the marker, tokenizer files, results, scores,
damaged-checkpoint moves) goes through here, the way Orbax reaches its own files: a local path
is expanded and made absolute, a URI is kept as it is (never `<cwd>/gs:/bucket/run`).

Writes are atomic where a reader could see half a file: a local file is written to a temp
name and renamed; an object store's single put is atomic already. Workdir metadata is written
by the first process only (`is_primary`), as Orbax does for its own files.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any, Iterator

import jax
from etils import epath

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# The schemes epath serves (gs:// through tf.io.gfile when TensorFlow is installed).
SCHEMES = ("gs", "s3", "az", "hf")


def scheme(path: str) -> str | None:
    """'gs' of 'gs://bucket/run'; None for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m[1] if m else None


def is_uri(path: str) -> bool:
    return scheme(path) is not None


def resolve(path: str) -> str:
    """A user's path as the one string the zoo keeps: local paths expanded and absolute,
    URIs unchanged. ValueError for a scheme epath cannot reach."""
    path = os.fspath(path)
    found = scheme(path)
    if found is None:
        return os.path.abspath(os.path.expanduser(path))
    if found not in SCHEMES:
        raise ValueError(f"{path}: {found}:// paths are not supported; use a local path or "
                         f"one of {', '.join(s + '://' for s in SCHEMES)}")
    stripped = path.rstrip("/")
    return path if stripped.endswith(":") else stripped


def _p(path: str) -> epath.Path:
    resolve(path)  # refuse unsupported schemes before epath reads them as relative paths
    return epath.Path(path)


def join(path: str, *parts: str) -> str:
    if is_uri(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    if is_uri(path):
        head = posixpath.dirname(path.rstrip("/"))
        return head if len(head) > len(f"{scheme(path)}://") else path
    return os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path)


def exists(path: str) -> bool:
    return _p(path).exists()


def isdir(path: str) -> bool:
    return _p(path).is_dir()


def isfile(path: str) -> bool:
    p = _p(path)
    return p.exists() and not p.is_dir()


def size(path: str) -> int:
    return _p(path).stat().length


def listdir(path: str) -> list[str]:
    """The entry names of a directory (a URI's 'subdir/' prefixes without the slash)."""
    return sorted({e.name.rstrip("/") for e in _p(path).iterdir()} - {""})


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk over a local directory or a URI prefix (prune by editing the dirs list)."""
    for root, dirs, files in _p(path).walk():
        yield os.fspath(root), dirs, files


def glob(pattern: str) -> list[str]:
    """Paths matching a pattern whose wildcards are in the last component only."""
    head, tail = dirname(pattern), basename(pattern)
    if not isdir(head):
        return []
    return sorted(os.fspath(p) for p in _p(head).glob(tail))


def makedirs(path: str) -> None:
    """Create a directory and its parents (on object stores: nothing to create)."""
    _p(path).mkdir(parents=True, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Move a file or directory; FileExistsError if `dst` exists."""
    _p(src).rename(_p(dst))


def rmtree(path: str) -> None:
    """Delete a directory and everything under it, if it exists."""
    if exists(path):
        _p(path).rmtree()


def remove(path: str) -> None:
    """Delete a file, if it exists."""
    _p(path).unlink(missing_ok=True)


def copy(src: str, dst: str) -> None:
    """Copy a file (overwriting `dst`)."""
    _p(src).copy(_p(dst), overwrite=True)


def read_bytes(path: str) -> bytes:
    return _p(path).read_bytes()


def read_text(path: str) -> str:
    return _p(path).read_text()


def read_json(path: str) -> Any:
    """The JSON value in a file (FileNotFoundError if missing, ValueError if not JSON)."""
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write a file whole or not at all: a local temp file renamed over `path`, one put on an
    object store."""
    if is_uri(path):
        _p(path).write_bytes(data)
        return
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data: Any) -> None:
    """Indented, key-sorted JSON, written whole or not at all."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_primary() -> bool:
    """Whether this process writes workdir metadata (the first one, as Orbax)."""
    return jax.process_index() == 0
