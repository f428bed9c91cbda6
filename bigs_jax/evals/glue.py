"""GLUE (Wang et al. 2018, https://gluebenchmark.com) as a fine-tuning data source.

Nine tasks: CoLA, SST-2, MRPC, STS-B, QQP, MNLI (scored on dev matched and mismatched), QNLI,
RTE, WNLI. Data comes from the official TSV files (`download_glue_data.py` layout:
`<data_dir>/<TASK>/{train,dev}.tsv`, MNLI `dev_matched.tsv` / `dev_mismatched.tsv`, CoLA
without a header) or from the tfds `glue` builder in a local `data_dir` (`config.data.format`).
Class ids follow tfds (MNLI: entailment, neutral, contradiction; QNLI/RTE: entailment,
not_entailment); STS-B is a one-output regression on the 0-5 score.

`data_source(config)` is what the train loop builds for `config.data.source = "glue"`; dev
scoring uses the official metrics (`evals.metrics`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import Optional

import numpy as np
from ml_collections import ConfigDict

from bigs_jax.data import registry
from bigs_jax.evals import finetune, metrics
from bigs_jax.evals.finetune import DataError
from bigs_jax.train.metrics import read_scores


@dataclasses.dataclass(frozen=True)
class Task:
    """One GLUE task: where its files are and which columns hold text and label."""

    name: str
    folder: str
    text: tuple            # TSV column names (or indices for header-less files)
    label: object
    classes: Optional[tuple[str, ...]]  # label strings in tfds order; None: regression
    tfds_text: tuple[str, ...]
    # (score column, TSV file, tfds split) of each dev set; "" is the task's name.
    dev: tuple[tuple[str, str, str], ...] = (("", "dev.tsv", "validation"),)
    header: bool = True

    @property
    def columns(self) -> list[str]:
        return [c or self.name for c, _, _ in self.dev]

    @property
    def num_labels(self) -> int:
        return len(self.classes) if self.classes else 1


_PAIR = ("sentence1", "sentence2")
_NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in (
    Task("cola", "CoLA", (3,), 1, ("0", "1"), ("sentence",), header=False),
    Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("sentence",)),
    Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), _PAIR),
    Task("stsb", "STS-B", _PAIR, "score", None, _PAIR),
    Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"),
         ("question1", "question2")),
    Task("mnli", "MNLI", _PAIR, "gold_label", ("entailment", "neutral", "contradiction"),
         ("premise", "hypothesis"), dev=(("mnli_m", "dev_matched.tsv", "validation_matched"),
                                         ("mnli_mm", "dev_mismatched.tsv",
                                          "validation_mismatched"))),
    Task("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, ("question", "sentence")),
    Task("rte", "RTE", _PAIR, "label", _NLI2, _PAIR),
    Task("wnli", "WNLI", _PAIR, "label", ("0", "1"), _PAIR),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Rows:
    """Raw examples: one tuple of texts per example, and labels (class ids or floats)."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray


def read_tsv(task: Task, path: str, *, train: bool) -> Rows:
    """Rows of an official GLUE TSV. Malformed train lines are skipped (QQP's train file has a
    few); a malformed dev line is an error, since skipping it would change the dev metric."""
    if not os.path.isfile(path):
        raise DataError(f"GLUE {task.name}: {path} not found; put the official GLUE files "
                        f"there ({task.folder}/ from download_glue_data.py) and pass their parent "
                        "as --config.data_dir, or use --config.format=tfds with a tfds data_dir")
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not lines:
            raise DataError(f"GLUE {task.name}: {path} is empty; expected a header line")
        head = [h.strip() for h in lines[0]]
        missing = [c for c in (*task.text, task.label) if c not in head]
        if missing:
            raise DataError(f"GLUE {task.name}: {path} has no column {missing} (header {head}); "
                            f"pass the official {task.folder} files")
        cols = [head.index(c) for c in (*task.text, task.label)]
        lines = lines[1:]
    else:
        cols = [*task.text, task.label]
    texts, labels, skipped = [], [], 0
    for n, line in enumerate(lines, 2 if task.header else 1):
        try:
            values = [line[c] for c in cols]
            label = (float(values[-1]) if task.classes is None
                     else task.classes.index(values[-1].strip()))
        except (IndexError, ValueError):
            if train:
                skipped += 1
                continue
            raise DataError(f"GLUE {task.name}: {path} line {n} is malformed ({line[:6]}); pass "
                            "the official file unchanged") from None
        texts.append(tuple(values[:-1]))
        labels.append(label)
    if skipped:
        print(f"GLUE {task.name}: skipped {skipped} malformed lines of {path}", flush=True)
    if not texts:
        raise DataError(f"GLUE {task.name}: {path} holds no examples")
    return Rows(texts, np.asarray(labels, np.float32 if task.classes is None else np.int32))


def read_tfds(task: Task, split: str, data_dir: str) -> Rows:
    """Rows of the tfds `glue/<task>` builder, prepared in `data_dir` (nothing is downloaded)."""
    # tfds takes seconds to import; only format=tfds reads it.
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    name = f"glue/{task.name}"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
        where = data_dir or "~/tensorflow_datasets"
        raise DataError(f"tfds dataset {name} (split {split}) is not prepared in {where} "
                        f"({type(e).__name__}); run tfds.builder('{name}', data_dir='{where}')"
                        ".download_and_prepare() or use --config.format=tsv") from None
    texts, labels = [], []
    for ex in tfds.as_numpy(ds):
        texts.append(tuple(ex[k].decode("utf-8") for k in task.tfds_text))
        labels.append(ex["label"])
    if not texts:
        raise DataError(f"tfds dataset {name} split {split} in {data_dir} holds no examples")
    return Rows(texts, np.asarray(labels, np.float32 if task.classes is None else np.int32))


def read(task: Task, config: ConfigDict, part: str) -> Rows:
    """`part` is "train" or one of the task's dev columns."""
    d = config.data
    if d.format not in ("tsv", "tfds"):
        raise DataError(f"unknown config.format {d.format!r}; choose tsv or tfds")
    if part == "train":
        file, split = "train.tsv", "train"
    else:
        _, file, split = next(x for x in task.dev if (x[0] or task.name) == part)
    if d.format == "tfds":
        rows = read_tfds(task, split, d.get("tfds_data_dir") or "")
    else:
        rows = read_tsv(task, os.path.join(d.data_dir, task.folder, file), train=part == "train")
    limit = d.get("max_train_examples" if part == "train" else "max_eval_examples") or 0
    if limit:
        rows = Rows(rows.texts[:limit], rows.labels[:limit])
    return rows


def train_size(config: ConfigDict) -> int:
    """Number of train examples (to turn epochs into steps)."""
    return len(read(get_task(config.data.task), config, "train").texts)


# ---------------------------------------------------------------------------- source


def _encode(vocab, rows: Rows, max_len: int):
    columns = list(zip(*rows.texts))
    return finetune.encode_examples(vocab, columns[0], columns[1] if len(columns) > 1 else None,
                                    max_len)


def scorer(task: Task, scale: tuple[float, float] = (0.0, 1.0)):
    """logits by column → ({column: metrics}, {column: predictions}); regression outputs are
    mapped back from standardized targets by `scale` = (mean, std)."""

    def score(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]):
        scores, preds = {}, {}
        for column, x in logits.items():
            p = x[:, 0] * scale[1] + scale[0] if task.classes is None else x.argmax(-1)
            scores[column] = metrics.glue_metrics(column, labels[column], p)
            preds[column] = p.tolist()
        return scores, preds

    return score


def data_source(config: ConfigDict) -> finetune.ExampleSource:
    d = config.data
    task = get_task(d.task)
    vocab = _vocabulary(config)
    train = read(task, config, "train")
    # STS-B: the head regresses standardized scores. From 0-5 targets the output would need
    # hundreds of Adam steps of size lr just to reach the mean (2.7); correlations are blind
    # to the affine map back.
    scale = ((float(train.labels.mean()), float(train.labels.std()) or 1.0)
             if task.classes is None else (0.0, 1.0))
    ids, types = _encode(vocab, train, d.seq_len)
    train_examples = finetune.Examples.build(ids, types, _scaled(train.labels, scale),
                                             d.seq_len)
    dev_ids, dev_types, dev_labels, columns, labels = [], [], [], {}, {}
    for column in task.columns:
        rows = read(task, config, column)
        ids, types = _encode(vocab, rows, d.get("eval_seq_len") or d.seq_len)
        columns[column] = (len(dev_ids), len(dev_ids) + len(ids))
        labels[column] = rows.labels
        dev_ids += ids
        dev_types += types
        dev_labels.append(_scaled(rows.labels, scale))
    length = finetune.eval_length(dev_ids, d.get("eval_seq_len") or d.seq_len)
    dev = finetune.Examples.build(dev_ids, dev_types, np.concatenate(dev_labels), length)
    return finetune.ExampleSource(
        config=config, train=train_examples, dev=dev, columns=columns,
        overrides={"vocab_size": vocab.vocab_size, "num_labels": task.num_labels},
        score_fn=functools.partial(scorer(task, scale), labels=labels), vocab=vocab)


def _scaled(labels: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    if labels.dtype.kind != "f":
        return labels
    return ((labels - scale[0]) / scale[1]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _cached_vocabulary(path_key: tuple):
    return finetune.vocabulary(ConfigDict({"init": path_key[0], "data": {
        "vocab_file": path_key[1], "lower_case": path_key[2]}}))


def _vocabulary(config: ConfigDict):
    d = config.data
    return _cached_vocabulary((config.get("init") or "", d.get("vocab_file") or "",
                               d.get("lower_case")))


# ---------------------------------------------------------------------------- eval.py

NAME = "glue"
HEADERS = {"cola": "CoLA (MCC)", "sst2": "SST-2 (acc)", "mrpc": "MRPC (F1/acc)",
           "stsb": "STS-B (P/S corr)", "qqp": "QQP (F1/acc)", "mnli": "MNLI-m/mm (acc)",
           "qnli": "QNLI (acc)", "rte": "RTE (acc)", "wnli": "WNLI (acc)"}


def objective(task: str) -> str:
    return "regression" if get_task(task).classes is None else "classification"


def model_options(task: str) -> dict:
    del task
    return {"head": "classification"}


def data_options(c: ConfigDict) -> dict:
    del c
    return {}


def finish(rc: ConfigDict, run_dir: str, how: str) -> dict:
    """The dev scores of the selected evaluation of a finished run."""
    step, entry = finetune.select(read_scores(run_dir), how)
    return {"step": step, "select": how, "scores": entry["scores"]}


def overall(tasks: dict) -> dict:
    """The GLUE score of the mean scores (over the tasks run; all nine for the real one)."""
    columns = {col: metrics.task_score({m: v["mean"] for m, v in ms.items()})
               for t in tasks.values() for col, ms in t["columns"].items()}
    names = sorted({"mnli" if c.startswith("mnli") else c for c in columns})
    return {"score": metrics.glue_score(columns), "score_tasks": names}


def _cell(ms: dict) -> str:
    parts = []
    for v in ms.values():
        text = "nan" if v["mean"] is None or np.isnan(v["mean"]) else f"{v['mean']:.1f}"
        if len(v["values"]) > 1:
            text += f"±{v['std']:.1f}"
        parts.append(text)
    return "/".join(parts)


def markdown(summary: dict) -> str:
    """The dev results as papers print them: one column per task, paired metrics as a/b."""
    order = [t for t in TASKS if t in summary["tasks"]]
    cells = []
    for t in order:
        cols = summary["tasks"][t]["columns"]
        cells.append("/".join(_cell(ms) for ms in cols.values()))
    n = len(summary["score_tasks"])
    score_head = "GLUE" if n == 9 else f"GLUE ({n}/9 tasks)"
    head = [HEADERS[t] for t in order] + [score_head]
    seeds = len(next(iter(summary["tasks"].values()))["seeds"])
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    lines = [f"GLUE dev results ({over})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(cells + [f"{summary['score']:.1f}"]) + " |", ""]
    return "\n".join(lines)


registry.register("glue", data_source)
