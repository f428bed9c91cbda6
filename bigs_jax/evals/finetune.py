"""The fine-tuning data source shared by GLUE and SCROLLS: tokenized examples in memory.

`ExampleSource` is what `loop.train_and_evaluate` reads through `config.data.source`
("glue", "scrolls"): deterministic, resumable, per-host train batches, padded dev batches
(padding rows carry `example_weights` 0), and `score(step, predict)`, which the loop calls at
every evaluation with a function from a host batch to the model's global logits. Scores (and
predictions) of each evaluated step are written to `<config.data.scores_dir>/dev/step_N.json`,
so a resumed run keeps the evaluations made before it was interrupted.

Batch `b` of the train stream holds positions [b·B, (b+1)·B) of the concatenation of epochs,
epoch e being a permutation of the train set drawn from (seed, e): any step can be resumed
without replaying the ones before it. Host p of P takes rows [p·B/P, (p+1)·B/P) of every global
batch, train and dev alike, so the global arrays the loop assembles are the global batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from bigs_jax.data import tasks
from bigs_jax.data import vocab as vocab_lib
from bigs_jax.data.wordpiece import truncate_pair
from bigs_jax.train import checkpointing
from bigs_jax.train.metrics import write_scores

class DataError(ValueError):
    """Missing or malformed fine-tuning data; reported to the user as one line."""


# ---------------------------------------------------------------------------- tokenizing


def vocabulary(config: ConfigDict):
    """The vocabulary of a fine-tuning run: `data.vocab_file` (a WordPiece vocab.txt or a
    SentencePiece model), else the one the `config.init` workdir records in tokenizer/."""
    d = config.data
    path = d.get("vocab_file") or ""
    if not path:
        if not config.get("init"):
            raise DataError("no vocabulary: set config.init to a train.py or converted workdir "
                            "(it records its vocabulary in tokenizer/) or config.vocab_file to "
                            "a WordPiece vocab.txt or SentencePiece .model")
        path = vocab_lib.workdir_vocabulary_file(checkpointing.resolve(config.init)[0])
        if path is None:
            raise DataError(f"config.init {config.init} records no vocabulary (no tokenizer/"
                            f"{' or tokenizer/'.join(vocab_lib.WORKDIR_VOCAB_FILES)}); pass "
                            "--config.vocab_file=PATH (the checkpoint's vocab.txt or .model)")
    try:
        return tasks.load_vocabulary(path, d.get("lower_case"))
    except (OSError, ValueError) as e:
        raise DataError(f"config.vocab_file {path}: {e}") from None


def encode_texts(vocab, texts: Sequence[str], chunk: int = 4096) -> list[list[int]]:
    """Token ids of many texts, tokenized in batches inside TensorFlow (fast)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        out.extend(vocab.encode_tf(tf.constant(list(texts[i:i + chunk]), tf.string)).to_list())
    return out


def encode_examples(vocab, texts_a: Sequence[str], texts_b: Optional[Sequence[str]],
                    max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, token types) of `[CLS] a [SEP] (b [SEP])` per example, truncated to `max_len`."""
    s = vocab_lib.special_ids(vocab)
    ids_a = encode_texts(vocab, texts_a)
    ids_b = encode_texts(vocab, texts_b) if texts_b is not None else None
    ids, types = [], []
    for i, a in enumerate(ids_a):
        if ids_b is None:
            row = [s.cls_id, *a[:max_len - 2], s.sep_id]
            ids.append(row)
            types.append([0] * len(row))
        else:
            a, b = truncate_pair(a, ids_b[i], max_len - 3)
            ids.append([s.cls_id, *a, s.sep_id, *b, s.sep_id])
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
    return ids, types


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:length]
    return out


@dataclasses.dataclass
class Examples:
    """Tokenized examples as padded arrays; `labels` int (classes) or float (regression).

    `lengths` holds each row's token count: the attention mask comes from it, not from the
    ids, since id 0 is a real token in some vocabularies (GPT-2's byte-level BPE: "!").
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @classmethod
    def build(cls, ids, types, labels, length: int) -> "Examples":
        lengths = np.array([min(len(r), length) for r in ids], np.int32)
        return cls(pad_rows(ids, length), pad_rows(types, length), np.asarray(labels), lengths)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        ids = self.input_ids[index]
        mask = np.arange(ids.shape[1]) < self.lengths[index][:, None]
        return {"input_ids": ids, "attention_mask": mask.astype(np.int32),
                "token_type_ids": self.token_type_ids[index], "labels": self.labels[index]}


def eval_length(rows: Sequence[Sequence[int]], cap: int) -> int:
    """Dev batches need no truncation: the longest row, rounded up to 8, at most `cap`."""
    longest = max((len(r) for r in rows), default=1)
    return min(cap, -(-longest // 8) * 8)


# ---------------------------------------------------------------------------- batches


def host_slice(batch: dict, global_size: int) -> dict:
    """This host's rows of a global batch."""
    n, p = jax.process_count(), jax.process_index()
    if global_size % n:
        raise DataError(f"batch size {global_size} is not divisible by the {n} processes; "
                        "pick a multiple")
    k = global_size // n
    return {key: v[p * k:(p + 1) * k] for key, v in batch.items()}


def train_index(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of global train batch `step` (epochs of seeded permutations)."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = pos // n, pos % n
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[offsets[epochs == e]]
    return out


def train_batches(examples: Examples, start_step: int, batch_size: int,
                  seed: int) -> Iterator[dict]:
    step = start_step
    while True:
        yield host_slice(examples.rows(train_index(step, len(examples), batch_size, seed)),
                         batch_size)
        step += 1


def eval_batches(examples: Examples, batch_size: int) -> list[dict]:
    """Host slices of the dev set in order, the last global batch padded with weight-0 rows."""
    n = len(examples)
    total = -(-n // batch_size) * batch_size
    index = np.minimum(np.arange(total), n - 1)
    out = []
    for i in range(0, total, batch_size):
        idx = index[i:i + batch_size]
        batch = examples.rows(idx)
        batch["example_weights"] = (np.arange(i, i + batch_size) < n).astype(np.float32)
        out.append(host_slice(batch, batch_size))
    return out


# ---------------------------------------------------------------------------- the source


@dataclasses.dataclass
class ExampleSource:
    """A fine-tuning data source over in-memory examples (see the module docstring).

    `columns` splits the dev stream into scored parts (MNLI-m then MNLI-mm): name -> (start,
    stop) row range; `score_fn(logits by column)` returns ({column: {metric: value}},
    {column: predictions to keep}).
    """

    config: ConfigDict
    train: Examples
    dev: Examples
    columns: dict[str, tuple[int, int]]
    overrides: dict
    score_fn: Callable[[dict[str, np.ndarray]], tuple[dict, dict]]
    vocab: Any = None  # the examples' vocabulary, recorded in the run's workdir

    def model_overrides(self) -> dict:
        return dict(self.overrides)

    def vocabulary(self):
        return self.vocab

    def iterators(self, start_step: int):
        d = self.config.data
        evals = eval_batches(self.dev, d.eval_batch_size)
        # The loop's eval loss may look at the first batches only; `score` sees the whole set.
        return (train_batches(self.train, start_step, d.batch_size, d.seed),
                evals[:d.get("eval_batches") or None])

    def score(self, step: int, predict: Callable[[dict], np.ndarray]) -> dict[str, float]:
        """Dev metrics of the current params; also saved as `dev/step_N.json`."""
        logits = np.concatenate([predict(b) for b in eval_batches(
            self.dev, self.config.data.eval_batch_size)])[:len(self.dev)]
        by_column = {c: logits[a:b] for c, (a, b) in self.columns.items()}
        scores, predictions = self.score_fn(by_column)
        write_scores(self.config.data.get("scores_dir") or "", step, scores, predictions)
        return {f"{c}/{m}": v for c, ms in scores.items() for m, v in ms.items()}


def select(scores: dict[int, dict], how: str) -> tuple[int, dict]:
    """(step, entry) of the best evaluation by the mean task score (NaN counts as worst), or
    of the last one. Ties go to the earlier step."""
    if not scores:
        raise DataError("no dev evaluation was recorded; rerun the same command")
    if how == "last":
        step = max(scores)
        return step, scores[step]
    if how != "best":
        raise DataError(f"unknown config.select {how!r}; choose best or last")

    def key(step):
        value = np.mean([np.mean(list(m.values())) for m in scores[step]["scores"].values()])
        return (-math.inf if math.isnan(value) else value, -step)

    step = max((s for s in scores if s > 0), key=key, default=max(scores))
    return step, scores[step]
