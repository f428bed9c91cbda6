"""GLUE / SCROLLS metrics against scikit-learn, scipy, rouge-score and hand-derived values."""

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from scipy import stats
from sklearn import metrics as skm

from bigs_jax.evals import metrics as M


@pytest.mark.parametrize("seed", range(4))
def test_glue_metrics_equal_sklearn_scipy_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert M.matthews(y, p) == pytest.approx(100 * skm.matthews_corrcoef(y, p), abs=1e-9)
    assert M.accuracy(y, p) == pytest.approx(100 * skm.accuracy_score(y, p), abs=1e-9)
    assert M.f1(y, p) == pytest.approx(100 * skm.f1_score(y, p), abs=1e-9)
    y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert M.glue_metrics("mnli_m", y3, p3)["accuracy"] == pytest.approx(
        100 * np.mean(y3 == p3), abs=1e-9)
    x, z = rng.uniform(0, 5, 100), rng.normal(size=100)
    z = np.round(z, 1)  # ties in the ranks
    assert M.pearson(x, z) == pytest.approx(100 * stats.pearsonr(x, z)[0], abs=1e-9)
    assert M.spearman(x, z) == pytest.approx(100 * stats.spearmanr(x, z)[0], abs=1e-9)


def test_glue_edge_cases():
    # All one class: MCC is 0 (sklearn's convention), F1 of no positives is 0.
    y = np.array([1, 0, 1, 1, 0])
    assert M.matthews(y, np.ones(5, int)) == 0.0 == 100 * skm.matthews_corrcoef(y, np.ones(5))
    assert M.f1(np.zeros(5, int), np.zeros(5, int)) == 0.0
    assert M.accuracy(np.zeros(5, int), np.zeros(5, int)) == 100.0
    # Perfect and inverted predictions.
    assert M.matthews(y, y) == pytest.approx(100.0)
    assert M.matthews(y, 1 - y) == pytest.approx(-100.0)
    # Hand-derived: y=[1,0,1,1,0], p=[1,1,0,1,0] → TP=2 FP=1 FN=1 TN=1:
    # F1 = 2·2/(2·2+1+1) = 2/3; MCC = (2·1 − 1·1)/sqrt(3·3·2·2) = 1/6.
    p = np.array([1, 1, 0, 1, 0])
    assert M.glue_metrics("mrpc", y, p) == pytest.approx({"f1": 200 / 3, "accuracy": 60.0})
    assert M.matthews(y, p) == pytest.approx(100 / 6)
    # Ties: Spearman of [1,2,2,3] vs [1,3,2,4] — ranks [1,2.5,2.5,4] vs [1,3,2,4].
    r = stats.pearsonr([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0]
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(100 * r)
    # A constant side has no correlation: NaN, as scipy says (and not a silent 0).
    assert math.isnan(M.pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))
    assert math.isnan(M.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="unknown GLUE column 'mnli'"):
        M.glue_metrics("mnli", y, p)
    with pytest.raises(ValueError, match="4 predictions for 5 labels"):
        M.glue_metrics("cola", y, p[:4])


def test_glue_score_reproduces_the_leaderboard():
    """BERT-base's row on the GLUE leaderboard (test set) prints a score of 78.3."""
    row = {"cola": {"mcc": 52.1}, "sst2": {"accuracy": 93.5},
           "mrpc": {"f1": 88.9, "accuracy": 84.8}, "stsb": {"pearson": 87.1, "spearman": 85.8},
           "qqp": {"f1": 71.2, "accuracy": 89.2}, "mnli_m": {"accuracy": 84.6},
           "mnli_mm": {"accuracy": 83.4}, "qnli": {"accuracy": 90.5},
           "rte": {"accuracy": 66.4}, "wnli": {"accuracy": 65.1}}
    columns = {k: M.task_score(v) for k, v in row.items()}
    # (52.1 + 93.5 + 86.85 + 86.45 + 80.2 + 84.0 + 90.5 + 66.4 + 65.1) / 9 = 705.1 / 9
    assert M.glue_score(columns) == pytest.approx(705.1 / 9)
    assert round(M.glue_score(columns), 1) == 78.3
    assert M.glue_score({"sst2": 90.0, "mnli_m": 80.0, "mnli_mm": 70.0}) == pytest.approx(82.5)


def test_squad_normalization_f1_em_by_hand():
    assert M.normalize_answer("The  Cat, an apple!") == "cat apple"
    # [cat, sat, on, mat] vs [cat, on, mat]: 3 shared → P = 3/4, R = 1 → F1 = 6/7.
    assert M.token_f1("The cat sat on a mat.", "cat on the mat") == pytest.approx(6 / 7)
    # [cat, sat, mat] vs [cat, on, mat]: 2 shared → P = R = 2/3 → F1 = 2/3.
    assert M.token_f1("cat sat mat", "cat on mat") == pytest.approx(2 / 3)
    # Repeated tokens count with multiplicity: [x x y] vs [x y y] shares one x, one y → 2/3.
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert M.token_f1("", "something") == 0.0  # empty prediction
    assert M.exact_match("Entailment.", "entailment") == 1.0
    assert M.exact_match("", "Not mentioned") == 0.0
    # Best over references, mean over examples: ex1 max(2/3, 1) = 1; ex2 0 → 50.
    assert M.best_over_references(M.token_f1, ["cat sat mat", ""],
                                  [["cat on mat", "sat cat mat"], ["x"]]) == pytest.approx(50.0)


def test_scrolls_docstring_examples():
    """The examples in the official metrics/scrolls.py docstring and their printed scores."""
    preds = ["exact match example", "hello there", "general kenobi"]
    refs = [["exact match example"], ["hello", "hi there"], ["commander kenobi"]]
    r = M.scrolls_metrics("gov_report", preds, refs)
    # By hand: rouge1 per example = 1, max(2/3, 1/2), 1/2 → 13/18; rouge2 = 1, 0, 0 → 1/3.
    assert r["rouge1"] == pytest.approx(100 * 13 / 18)
    assert r["rouge2"] == pytest.approx(100 / 3)
    assert r["rougeL"] == pytest.approx(100 * 13 / 18)
    assert r["score"] == pytest.approx((100 * 13 / 18) ** (2 / 3) * (100 / 3) ** (1 / 3))
    assert round(r["score"], 4) == 55.8136
    assert round(M.scrolls_metrics("contract_nli", preds, refs)["score"], 4) == 33.3333
    assert round(M.scrolls_metrics("narrative_qa", preds, refs)["f1"], 4) == 72.2222


def test_rouge_equals_rouge_score_on_random_text():
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    preds = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(20)]
    refs = [[" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(rng.integers(1, 4))]
            for _ in range(20)]
    preds[3] = ""  # an empty prediction scores 0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    got = M.rouge(preds, refs)
    for t in ("rouge1", "rouge2", "rougeL"):
        want = np.mean([max(scorer.score(r, p)[t].fmeasure for r in rs)
                        for p, rs in zip(preds, refs)])
        assert got[t] == pytest.approx(100 * want, abs=1e-9)
    assert M.rouge([""], [["a b"]])["geometric_mean"] == 0.0
    assert M.scrolls_score({"gov_report": 30.0, "qasper": 20.0, "quality": 40.0}) == 30.0
    with pytest.raises(ValueError, match="2 predictions for 1 reference lists"):
        M.rouge(["a", "b"], [["a"]])
