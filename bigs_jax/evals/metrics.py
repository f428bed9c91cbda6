"""GLUE and SCROLLS metrics, as the benchmarks define them (research/frameworks.md §4).

Every score is a percentage (×100), as papers and leaderboards print them.

GLUE: Matthews correlation (CoLA), accuracy, F1 + accuracy (MRPC, QQP), Pearson + Spearman
(STS-B), from scikit-learn and scipy. A task's score is the mean of its metrics; the GLUE
score is the mean over the nine tasks with MNLI-m and MNLI-mm averaged into one MNLI score,
WNLI included and AX excluded: that is what the GLUE leaderboard prints (BERT-base's row,
52.1 / 93.5 / 88.9,84.8 / 87.1,85.8 / 71.2,89.2 / 84.6,83.4 / 90.5 / 66.4 / 65.1, gives its
78.3; see tests/evals/test_metrics.py).

SCROLLS (the official `metrics/scrolls.py` of the HF hub repo tau/scrolls): ROUGE-1/2/L
F-measure from `rouge_score` without stemming, summarized by their geometric mean (GovReport,
SummScreenFD, QMSum); SQuAD-style token F1 (Qasper, NarrativeQA); exact match after SQuAD
normalization (QuALITY, ContractNLI). Each example takes its best score over its references
(for ROUGE, per ROUGE type), and the SCROLLS score is the unweighted mean of the task scores.
ROUGE-Lsum (reported by the official module, not part of any score) is not computed: it needs
NLTK's sentence splitter data.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

# ---------------------------------------------------------------------------- GLUE

# Column name -> (metrics of the task, in the order papers print them).
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli_m": ("accuracy",),
    "mnli_mm": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}
# The nine tasks of the GLUE score; MNLI's score is the mean of its two dev/test sets.
GLUE_SCORE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def accuracy(labels: Sequence, predictions: Sequence) -> float:
    return 100.0 * float(skm.accuracy_score(labels, predictions))


def matthews(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation ×100; 0 when a side is constant (scikit-learn's convention)."""
    return 100.0 * float(skm.matthews_corrcoef(labels, predictions))


def f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Binary F1 of class 1 ×100; 0 when there is no positive on either side."""
    return 100.0 * float(skm.f1_score(labels, predictions, zero_division=0.0))


def pearson(labels: Sequence[float], predictions: Sequence[float]) -> float:
    """Pearson r ×100 (scipy); NaN when a side is constant (no correlation is defined)."""
    return _correlation(stats.pearsonr, labels, predictions)


def spearman(labels: Sequence[float], predictions: Sequence[float]) -> float:
    """Spearman rho ×100 (scipy; ties get average ranks); NaN when a side is constant."""
    return _correlation(stats.spearmanr, labels, predictions)


def _correlation(fn: Callable, labels, predictions) -> float:
    x, y = np.asarray(labels, np.float64), np.asarray(predictions, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return 100.0 * float(fn(x, y)[0])


_GLUE_FNS = {"mcc": matthews, "accuracy": accuracy, "f1": f1, "pearson": pearson,
             "spearman": spearman}


def glue_metrics(task: str, labels: Sequence, predictions: Sequence) -> dict[str, float]:
    """{metric: value} of one GLUE column (`GLUE_METRICS` keys, e.g. "mrpc", "mnli_m")."""
    if task not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE column {task!r}; choose one of {sorted(GLUE_METRICS)}")
    if len(labels) != len(predictions) or not len(labels):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(labels)} labels; "
                         "need the same non-zero number")
    return {m: _GLUE_FNS[m](labels, predictions) for m in GLUE_METRICS[task]}


def task_score(values: Mapping[str, float]) -> float:
    """A task's single score: the mean of its metrics (F1/acc, Pearson/Spearman)."""
    return float(np.mean(list(values.values())))


def glue_score(columns: Mapping[str, float]) -> float:
    """The GLUE score from per-column scores (`GLUE_METRICS` keys, each a `task_score`).

    MNLI-m and MNLI-mm are averaged into one MNLI score first; the result is the mean over the
    GLUE tasks present (all nine for the leaderboard's number).
    """
    scores = {k: v for k, v in columns.items() if k in GLUE_METRICS}
    mnli = [scores.pop(k) for k in ("mnli_m", "mnli_mm") if k in scores]
    if mnli:
        scores["mnli"] = float(np.mean(mnli))
    if not scores:
        raise ValueError(f"no GLUE column among {sorted(columns)}")
    return float(np.mean(list(scores.values())))


# ---------------------------------------------------------------------------- SCROLLS

SCROLLS_METRIC = {
    "gov_report": "rouge", "summ_screen_fd": "rouge", "qmsum": "rouge",
    "qasper": "f1", "narrative_qa": "f1",
    "quality": "exact_match", "contract_nli": "exact_match",
}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1 token F1 in [0, 1] over normalized tokens (0 when nothing is shared)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _references(references: Sequence[Sequence[str]], n: int) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != n or any(not r for r in refs):
        raise ValueError(f"{n} predictions for {len(refs)} reference lists (each needs at "
                         "least one reference); pass one list of references per prediction")
    return refs


def best_over_references(fn: Callable[[str, str], float], predictions: Sequence[str],
                         references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of each example's best `fn(prediction, reference)`, ×100."""
    refs = _references(references, len(predictions))
    if not refs:
        raise ValueError("no predictions to score")
    return 100.0 * float(np.mean([max(fn(p, r) for r in rs)
                                  for p, rs in zip(predictions, refs)]))


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure ×100 (best reference per type) and their geometric mean."""
    # rouge_score pulls in nltk (seconds to import); only generation tasks need it.
    from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel

    refs = _references(references, len(predictions))
    if not refs:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    best = {t: [] for t in ROUGE_TYPES}
    for pred, rs in zip(predictions, refs):
        scores = [scorer.score(r, pred) for r in rs]
        for t in ROUGE_TYPES:
            best[t].append(max(s[t].fmeasure for s in scores))
    out = {t: 100.0 * float(np.mean(v)) for t, v in best.items()}
    out["geometric_mean"] = float(np.prod([out[t] for t in ROUGE_TYPES]) ** (1 / 3))
    return out


def scrolls_metrics(task: str, predictions: Sequence[str],
                    references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The official metrics of one SCROLLS task; key "score" is its SCROLLS score."""
    if task not in SCROLLS_METRIC:
        raise ValueError(f"unknown SCROLLS task {task!r}; choose one of "
                         f"{sorted(SCROLLS_METRIC)}")
    kind = SCROLLS_METRIC[task]
    if kind == "rouge":
        out = rouge(predictions, references)
        return {**out, "score": out["geometric_mean"]}
    fn = token_f1 if kind == "f1" else exact_match
    value = best_over_references(fn, predictions, references)
    return {kind: value, "score": value}


def scrolls_score(task_scores: Mapping[str, float]) -> float:
    """The SCROLLS score: the unweighted mean of the task scores present."""
    scores = [v for k, v in task_scores.items() if k in SCROLLS_METRIC]
    if not scores:
        raise ValueError(f"no SCROLLS task among {sorted(task_scores)}")
    return float(np.mean(scores))
