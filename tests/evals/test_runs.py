"""eval.py's runner end to end on tiny models: tables, reuse, resume, refusals, SCROLLS.

The fine-tuning runs are marked slow (run them with `pytest -m slow tests/evals`).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bigs_jax.evals import glue, metrics, runner
from bigs_jax.evals.finetune import DataError
from bigs_jax.train import metrics as train_metrics
from bigs_jax.train.loop import ConfigError
from configs import glue as glue_config
from configs import scrolls as scrolls_config
from tests.evals.glue_files import write_jsonl
from tests.evals.workdirs import tiny_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, glue_files):
    root = tmp_path_factory.mktemp("runs")
    glue_dir, vocab = glue_files
    shutil.copyfile(vocab, root / "vocab.txt")
    init = tiny_workdir(root / "bert", "bert-tiny", vocab, vocab_size=35, max_len=64)
    return root, glue_dir, init


def smoke_config(glue_dir, init, **kw):
    c = glue_config.get_config("smoke")
    c.init, c.data_dir = init, glue_dir
    c.max_steps, c.evals, c.batch_size, c.eval_batch_size = 2, 2, 4, 4
    c.max_len, c.eval_max_len = 16, 32
    for k, v in kw.items():
        c[k] = v
    return c


def test_aggregate_and_table():
    runs = {"mrpc": [{"seed": s, "step": 10, "seconds": 1.0,
                      "scores": {"mrpc": {"f1": f, "accuracy": a}}}
                     for s, (f, a) in enumerate([(80.0, 70.0), (90.0, 74.0)])],
            "mnli": [{"seed": 0, "step": 5, "seconds": 1.0,
                      "scores": {"mnli_m": {"accuracy": 60.0}, "mnli_mm": {"accuracy": 62.0}}},
                     {"seed": 1, "step": 5, "seconds": 1.0,
                      "scores": {"mnli_m": {"accuracy": 64.0}, "mnli_mm": {"accuracy": 66.0}}}]}
    summary = runner.aggregate(runs, glue)
    f1 = summary["tasks"]["mrpc"]["columns"]["mrpc"]["f1"]
    assert f1["mean"] == 85.0 and f1["std"] == pytest.approx(np.std([80, 90], ddof=1))
    # MRPC (85 + 72) / 2 = 78.5; MNLI (62 + 64) / 2 = 63 → GLUE over 2 tasks = 70.75.
    assert summary["score"] == pytest.approx(70.75)
    table = glue.markdown(summary)
    assert "| MRPC (F1/acc) | MNLI-m/mm (acc) | GLUE (2/9 tasks) |" in table
    assert "| 85.0±7.1/72.0±2.8 | 62.0±2.8/64.0±2.8 | 70.8 |" in table


@pytest.mark.slow  # fine-tunes tiny models (30-90 s on 2 cores)
def test_glue_run_reuse_and_refusal(setup, capsys):
    root, glue_dir, init = setup
    out = str(root / "out1")
    summary = runner.evaluate(smoke_config(glue_dir, init, tasks="rte"), out)
    result = json.load(open(os.path.join(out, "rte", "seed0", "result.json")))
    run = os.path.join(out, "rte", "seed0")
    scores = json.load(open(os.path.join(run, "dev", f"step_{result['step']}.json")))
    assert result["scores"] == scores["scores"]
    acc = result["scores"]["rte"]["accuracy"]
    labels = glue.read(glue.TASKS["rte"], _data(glue_dir), "rte").labels
    assert acc == pytest.approx(metrics.accuracy(labels, scores["predictions"]["rte"]))
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["tasks"]["rte"]["columns"]["rte"]["accuracy"]["values"] == [acc]
    assert saved["score"] == pytest.approx(acc)
    assert "| RTE (acc) | GLUE (1/9 tasks) |" in open(os.path.join(out, "results.md")).read()
    assert os.listdir(os.path.join(out, "tb"))
    # Rerunning reuses the finished run; other settings in the same directory are refused.
    capsys.readouterr()
    assert runner.evaluate(smoke_config(glue_dir, init, tasks="rte"), out) == summary
    assert "rte seed 0: reusing" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"rte/seed0 holds a run with other settings \(differs "
                                          r"in \['optim.lr'\]\)"):
        runner.evaluate(smoke_config(glue_dir, init, tasks="rte", lr=3e-4), out)


def _data(glue_dir):
    from ml_collections import ConfigDict

    return ConfigDict({"data": {"format": "tsv", "data_dir": glue_dir}})


@pytest.mark.slow  # fine-tunes tiny models (30-90 s on 2 cores)
def test_interrupted_run_resumes(setup, monkeypatch, capsys):
    root, glue_dir, init = setup
    out = str(root / "out2")
    c = smoke_config(glue_dir, init, tasks="stsb", max_steps=4, evals=4)

    class StopAfterTwoSteps(train_metrics.StopSignal):
        checks = 0

        @property
        def received(self):
            StopAfterTwoSteps.checks += 1
            return "SIGTERM" if StopAfterTwoSteps.checks == 2 else None

        @received.setter
        def received(self, value):
            pass

    monkeypatch.setattr(train_metrics, "StopSignal", StopAfterTwoSteps)
    assert runner.evaluate(c, out) is None  # stopped: nothing summarized yet
    run = os.path.join(out, "stsb", "seed0")
    assert not os.path.exists(os.path.join(run, "result.json"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]
    monkeypatch.undo()
    capsys.readouterr()
    summary = runner.evaluate(c, out)
    assert "resuming from step 2" in capsys.readouterr().out
    steps = sorted(int(f[5:-5]) for f in os.listdir(os.path.join(run, "dev")))
    assert steps == [1, 2, 3, 4]  # every evaluation, before and after the interruption
    assert summary["tasks"]["stsb"]["steps"][0] in steps


@pytest.mark.slow  # fine-tunes tiny models (30-90 s on 2 cores)
def test_mnli_start_transfers_everything_but_the_classifier(setup):
    root, glue_dir, init = setup
    out = str(root / "out3")
    runner.evaluate(smoke_config(glue_dir, init, tasks="mrpc", from_mnli=True), out)
    assert os.path.exists(os.path.join(out, "mnli", "seed0", "result.json"))
    import bigs_jax
    from flax import nnx

    mnli = nnx.to_pure_dict(nnx.state(bigs_jax.load(os.path.join(out, "mnli", "seed0"))))
    start = nnx.to_pure_dict(nnx.state(bigs_jax.load(os.path.join(out, "mrpc", "seed0", "init"))))
    np.testing.assert_array_equal(start["classifier"]["pooler"]["kernel"],
                                  mnli["classifier"]["pooler"]["kernel"])
    np.testing.assert_array_equal(start["layers"][1]["mlp"]["up"]["kernel"],
                                  mnli["layers"][1]["mlp"]["up"]["kernel"])
    assert mnli["classifier"]["classifier"]["kernel"].shape[-1] == 3
    assert start["classifier"]["classifier"]["kernel"].shape[-1] == 2


def test_eval_py_errors_are_one_line(setup):
    """Flag mistakes through the real eval.py; the runner's own refusals in-process."""
    root, glue_dir, init = setup

    def run(*flags):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *flags],
                           capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "PYTHONPATH": ROOT})
        lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
        return lines[0]

    out = str(root / "bad")
    assert "unknown GLUE task 'sst3'; choose from cola" in run(
        f"--config.init={init}", "--config.tasks=sst3", f"--workdir={out}")
    assert "flag --config.lr=fast: could not convert string to float" in run(
        "--config.lr=fast", f"--workdir={out}")
    c = glue_config.get_config()
    with pytest.raises(ConfigError, match="config.init is empty; pass --config.init=WORKDIR"):
        runner.evaluate(c, out)
    c.init, c.tasks = init, "rte"
    with pytest.raises(ConfigError, match="max_len 128 for rte exceeds the max_len 64 of "
                                          "config.init"):
        runner.evaluate(c, out)
    c.per_task.rte.max_len, c.data_dir = 32, str(root / "nothing")
    with pytest.raises(DataError, match=f"GLUE rte: {root}/nothing/RTE/train.tsv not found; "
                                        "put the official"):
        runner.evaluate(c, out)
    c.data_dir, c.seeds = glue_dir, "0,x"
    with pytest.raises(ConfigError, match="config.seeds '0,x' is not a list of integers"):
        runner.evaluate(c, out)
    assert not os.path.exists(os.path.join(out, "rte"))


def _contract_nli_files(root):
    doc = " ".join(["the man sat on the mat . it is good ."] * 60)  # ~900 tokens per document
    rows = {"train": [], "validation": []}
    for split, n in (("train", 8), ("validation", 4)):
        for i in range(n):
            hyp = ("the man sat", "the dog runs", "it is bad")[i % 3]
            rows[split].append({"id": f"{split}{i}", "pid": f"{split}{i}_0",
                                "input": f"{hyp}\n\n{doc} {'not ' * i}fun",
                                "output": ("Entailment", "Not mentioned", "Contradiction")[i % 3]})
        write_jsonl(root / "contract_nli" / f"{split}.jsonl", rows[split])
    return rows


@pytest.mark.slow  # fine-tunes tiny models (30-90 s on 2 cores)
def test_bigs_at_4096_fine_tunes_and_scores_contract_nli(setup):
    """Acceptance 4a: a BiGS encoder at length 4096 on ContractNLI-format files."""
    root, _, _ = setup
    data = root / "scrolls"
    rows = _contract_nli_files(data)
    init = tiny_workdir(root / "bigs", "bigs-tiny", str(root / "vocab.txt"), vocab_size=35,
                        max_len=4096)
    c = scrolls_config.get_config("smoke")
    c.init, c.data_dir, c.tasks = init, str(data), "contract_nli"
    c.max_len = c.eval_max_len = 4096
    c.batch_size = c.eval_batch_size = 2
    c.lr = 1e-3
    out = str(root / "out_cnli")
    summary = runner.evaluate(c, out)
    run = os.path.join(out, "contract_nli", "seed0")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["data"]["seq_len"] == 4096 and cfg["model"]["name"] == "encoder"
    predictions = json.load(open(os.path.join(run, "predictions.json")))
    assert sorted(predictions) == [r["id"] for r in rows["validation"]]
    refs = {r["id"]: [r["output"]] for r in rows["validation"]}
    want = metrics.scrolls_metrics("contract_nli", list(predictions.values()),
                                   [refs[k] for k in predictions])["exact_match"]
    got = summary["tasks"]["contract_nli"]["columns"]["contract_nli"]["exact_match"]["mean"]
    assert got == pytest.approx(want)
    assert summary["score"] == pytest.approx(want)
    assert "CNLI (EM)" in open(os.path.join(out, "results.md")).read()


@pytest.mark.slow  # fine-tunes tiny models (30-90 s on 2 cores)
def test_causal_model_generates_and_scores_gov_report(setup):
    """Acceptance 4b: GPT-2 fine-tuned on GovReport-format files, decoded greedily, scored."""
    root, _, _ = setup
    data = root / "scrolls_gen"
    summary_text = "the dog sat on the mat"
    for split, n in (("train", 6), ("validation", 3)):
        write_jsonl(data / "gov_report" / f"{split}.jsonl",
                    [{"id": f"{split}{i}", "pid": f"{split}{i}",
                      "input": f"report {i} : the man runs . the dog sat on the mat .",
                      "output": summary_text} for i in range(n)])
    init = tiny_workdir(root / "gpt2", "gpt2-tiny", str(root / "vocab.txt"), vocab_size=35)
    c = scrolls_config.get_config("smoke")
    c.init, c.data_dir, c.tasks = init, str(data), "gov_report"
    c.max_len, c.max_target_len, c.lr, c.max_steps = 32, 8, 3e-3, 60
    out = str(root / "out_gov")
    summary = runner.evaluate(c, out)
    predictions = json.load(open(os.path.join(out, "gov_report", "seed0", "predictions.json")))
    assert sorted(predictions) == ["validation0", "validation1", "validation2"]
    refs = [[summary_text]] * 3
    want = metrics.scrolls_metrics("gov_report", list(predictions.values()), refs)
    got = summary["tasks"]["gov_report"]["columns"]["gov_report"]
    for k in ("rouge1", "rouge2", "rougeL", "geometric_mean"):
        assert got[k]["mean"] == pytest.approx(want[k])
    # 60 steps on one repeated summary: the model has learned to write it.
    assert got["rouge1"]["mean"] > 50, predictions
    assert summary["score"] == pytest.approx(want["geometric_mean"])


@pytest.mark.slow
def test_tfds_glue_task_end_to_end_with_mock_data(setup):
    """format=tfds through the real `glue/rte` builder (tfds.testing.mock_data)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    root, glue_dir, init = setup
    c = smoke_config(glue_dir, init, tasks="rte", format="tfds",
                     tfds_data_dir=str(root / "tfds"))
    with tfds.testing.mock_data(num_examples=12):
        summary = runner.evaluate(c, str(root / "out_tfds"))
    cfg = json.load(open(os.path.join(root, "out_tfds", "rte", "seed0", "config.json")))
    assert cfg["data"]["format"] == "tfds"
    acc = summary["tasks"]["rte"]["columns"]["rte"]["accuracy"]["mean"]
    assert acc * 12 / 100 == pytest.approx(round(acc * 12 / 100))  # k of the 12 mock rows
