"""TAPE remote homology (Rao et al. 2019) read from local disk, for the FPT task of that name.

Two layouts are accepted, in `config.data.data_dir` or its `remote_homology/` folder:

- TAPE's own download, `remote_homology.tar.gz` unpacked (the official FPT code's README puts
  it in `data/tape/remote_homology/`): one LMDB database per split,
  `remote_homology_{train,valid,test_fold_holdout}.lmdb`, as TAPE's `LMDBDataset` reads them:
  key b"num_examples" holds the pickled count, keys b"0", b"1", ... the pickled records
  (dicts with `primary`, the amino-acid string, `fold_label`, `protein_length`, `id`,
  `class_label`, `superfamily_label`, `secondary_structure`, `solvent_accessibility`,
  `evolutionary`, ...). The records are unpickled, as TAPE does, and unpickling runs code the
  file chooses: read only databases from a source you trust (TAPE's download).
- `remote_homology_{train,valid,test_fold_holdout}.json`: JSON lists of the same records
  (`primary` and `fold_label` are the ones read).

Sequences are encoded as TAPE's tokenizer does: <cls> + one id per residue + <sep>, in TAPE's
IUPAC vocabulary (a letter outside it becomes <unk>, where TAPE would raise).
"""

from __future__ import annotations

import json
import os
import pickle

import lmdb
import numpy as np

# TAPE's IUPAC vocabulary (tape.tokenizers.IUPAC_VOCAB): 5 specials, then 25 letters.
VOCAB = ("<pad>", "<mask>", "<cls>", "<sep>", "<unk>") + tuple("ABCDEFGHIKLMNOPQRSTUVWXYZ")
CLS, SEP, UNK = 2, 3, 4
FORMATS = ("lmdb", "json")


def locate(data_dir: str) -> tuple[str, str]:
    """(folder, "lmdb" or "json") of the first layout found: in data_dir, then in
    data_dir/remote_homology."""
    root = os.path.expanduser(data_dir)
    for folder in (root, os.path.join(root, "remote_homology")):
        for fmt in FORMATS:
            if os.path.exists(os.path.join(folder, f"remote_homology_train.{fmt}")):
                return folder, fmt
    raise FileNotFoundError(
        f"no TAPE remote homology in config.data.data_dir {root!r}: neither "
        "remote_homology_train.lmdb (TAPE's remote_homology.tar.gz unpacked; data_dir is its "
        "remote_homology/ folder or the folder holding that) nor remote_homology_train.json "
        "(JSON lists of {primary, fold_label} records) is there or in remote_homology/; put "
        "remote_homology_{train,valid,test_fold_holdout}.lmdb or .json there")


def read_split(folder: str, fmt: str, split: str) -> list[dict]:
    """The records of `remote_homology_{split}.{fmt}` in `folder` (see the module docstring)."""
    path = os.path.join(folder, f"remote_homology_{split}.{fmt}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found next to remote_homology_train.{fmt}: "
                                f"put all three splits (train, valid, test_fold_holdout) there")
    if fmt == "json":
        with open(path) as f:
            records = json.load(f)
    else:
        records = read_lmdb(path)
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "primary" not in r or "fold_label" not in r:
            raise ValueError(f"{path}: record {i} is not a dict with `primary` and `fold_label` "
                             f"(got {type(r).__name__}); is this TAPE's remote homology?")
    return records


def read_lmdb(path: str) -> list[dict]:
    """The unpickled records 0..num_examples-1 of one TAPE LMDB database (trusted files only:
    unpickling runs code the file chooses)."""
    try:
        with lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                       readahead=False, meminit=False) as env, env.begin(write=False) as txn:
            count = _unpickle(txn, b"num_examples", path)
            if not isinstance(count, (int, np.integer)):
                raise ValueError(f"{path}: b'num_examples' holds {type(count).__name__}, not an "
                                 "int; is this a TAPE LMDB database?")
            return [_unpickle(txn, str(i).encode(), path) for i in range(int(count))]
    except lmdb.Error as e:
        raise ValueError(f"{path} is not a readable LMDB database ({_first_line(e)}); unpack "
                         "TAPE's remote_homology.tar.gz again") from None


def _unpickle(txn: lmdb.Transaction, key: bytes, path: str):
    raw = txn.get(key)
    if raw is None:
        raise ValueError(f"{path} has no key {key!r}: not a complete TAPE LMDB database; unpack "
                         "TAPE's remote_homology.tar.gz again")
    try:
        return pickle.loads(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: the value of key {key!r} does not unpickle "
                         f"({_first_line(e)}); unpack TAPE's remote_homology.tar.gz "
                         "again") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def length(record: dict) -> int:
    """The record's tokens: <cls> + residues + <sep>."""
    return len(record["primary"]) + 2


def encode(records: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (N, seq_len): <cls> + residues + <sep>, cut at seq_len, 0-padded;
    fold labels int32 (N,))."""
    ids = {t: i for i, t in enumerate(VOCAB)}
    x = np.zeros((len(records), seq_len), np.int32)
    for k, r in enumerate(records):
        row = [CLS] + [ids.get(a, UNK) for a in r["primary"]] + [SEP]
        x[k, :min(len(row), seq_len)] = row[:seq_len]
    return x, np.asarray([r["fold_label"] for r in records], np.int32)
