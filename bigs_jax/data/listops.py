"""ListOps (Nangia & Bowman 2018) as the Long Range Arena defines it: a generator and a reader.

An example is a nested prefix expression over the digits 0-9 with the operators `[MIN`,
`[MAX`, `[MED` (median) and `[SM` (sum mod 10), each closed by `]`; the label is its value:

    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

The generator follows LRA's definition (lra_benchmarks/data/listops.py, read, not copied):
from depth 1 a node is a digit with probability 0.75 and otherwise an operator over 2..max_args
children, down to max_depth (10); trees whose length (operators, digits and `]`, not
parentheses) is outside [min_length, max_length] are drawn again. LRA's files also hold the
parentheses of its tuple printing, `( ( [MAX 2 ) 9 ) ] )`; they carry no information in prefix
notation, so `parens=False` (the default) leaves them out and sequences are shorter. The
bracket tokens `[MIN`... and `]` are kept as tokens (the FPT loader dropped them; research
fpt_growth.md §1.5). A median of an even count is the integer part of the middle pair's mean.

`read_tsv` reads LRA's released `basic_{train,val,test}.tsv` (header `Source\tTarget`).
"""

from __future__ import annotations

import csv
import functools
import os
import statistics
from typing import Optional

import numpy as np

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
# id 0 is padding; then the digits, the operators, the closing bracket and the parentheses.
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]", "(", ")")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
VALUE_P = 0.25  # probability that a node below max_depth is an operator


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


class _TooLong(Exception):
    """A tree under construction passed max_length: it would be rejected anyway."""


def _tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int, budget: list):
    """(tokens without parentheses, value, nested form for the parenthesized rendering).

    `budget` ([tokens left]) stops a tree as soon as it outgrows max_length: most draws are
    far too long, and finishing them only to reject them dominates the generation time.
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLong
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        v = int(rng.integers(10))
        return [str(v)], v, str(v)
    budget[0] -= 1  # the closing bracket
    op = OPERATORS[int(rng.integers(len(OPERATORS)))]
    children = [_tree(rng, depth + 1, max_depth, max_args, budget)
                for _ in range(int(rng.integers(2, max_args + 1)))]
    tokens = [op] + [t for c in children for t in c[0]] + ["]"]
    nested = op
    for c in children:
        nested = (nested, c[2])
    return tokens, _apply(op, [c[1] for c in children]), (nested, "]")


def _render(nested) -> list[str]:
    """LRA's printing of the nested pairs: '( a b )'."""
    if isinstance(nested, str):
        return [nested]
    return ["("] + _render(nested[0]) + _render(nested[1]) + [")"]


@functools.lru_cache(maxsize=8)  # the protocol's runs share their generated sets
def generate(n: int, *, seed: int, min_length: int = 500, max_length: int = 2000,
             max_depth: int = 10, max_args: int = 10,
             parens: bool = False) -> tuple[list[list[str]], np.ndarray]:
    """`n` (token list, label) pairs drawn as LRA does, from `seed` alone (cached: treat the
    result as read-only)."""
    if min_length > max_length:
        raise ValueError(f"ListOps min_length {min_length} exceeds max_length {max_length}")
    rng = np.random.default_rng(seed)
    sources, labels = [], []
    while len(sources) < n:
        try:
            tokens, value, nested = _tree(rng, 1, max_depth, max_args, [max_length])
        except _TooLong:
            continue
        if min_length <= len(tokens) <= max_length:
            sources.append(_render(nested) if parens else tokens)
            labels.append(value)
    return sources, np.asarray(labels, np.int32)


def encode(sources: list[list[str]], length: int) -> tuple[np.ndarray, int]:
    """(int32 (N, length) right-padded ids, number of rows cut at `length`)."""
    ids = np.zeros((len(sources), length), np.int32)
    cut = 0
    for i, tokens in enumerate(sources):
        try:
            row = [TOKEN_ID[t] for t in tokens]
        except KeyError as e:
            raise ValueError(f"ListOps token {e.args[0]!r} is not in the LRA vocabulary "
                             f"{VOCAB[1:]}") from None
        cut += len(row) > length
        row = row[:length]
        ids[i, :len(row)] = row
    return ids, cut


def tsv_path(data_dir: str, split: str) -> str:
    return os.path.join(os.path.expanduser(data_dir), f"basic_{split}.tsv")


def read_tsv(data_dir: str, split: str) -> tuple[list[list[str]], np.ndarray]:
    """(token lists, labels) of LRA's `basic_{split}.tsv` in `data_dir` (split: train, val,
    test)."""
    path = tsv_path(data_dir, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: put LRA's listops-1000 files basic_{{train,val,test}}.tsv "
            "(lra_release/listops-1000 of the LRA release) in config.data.data_dir, or set "
            "config.data.listops_source=generate")
    sources, labels = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header: Optional[list[str]] = next(reader, None)
        if header != ["Source", "Target"]:
            raise ValueError(f"{path} starts with {header}, not LRA's header Source\\tTarget")
        for row in reader:
            sources.append(row[0].split())
            labels.append(int(row[1]))
    return sources, np.asarray(labels, np.int32)
