"""Pretrain with train.py, then evaluate with eval.py (issue 17, item 4).

Every workdir train.py writes records its vocabulary in tokenizer/ (here the embedded
SentencePiece model), so `eval.py --config.init=WORKDIR` and `data.tasks.load_vocabulary`
find it without flags; a SentencePiece `.model` passed where a vocabulary is expected works.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from bigs_jax.data import tasks, vocab, wordpiece
from bigs_jax.evals import finetune, glue, metrics, runner
from configs import glue as glue_config
from tests.runs import ROOT

FAMILIES = {  # a tiny model of each encoder family, 2 steps on the embedded corpus
    "bigs": ["--config=configs/quickstart.py:smoke"],
    "bert": ["--config=configs/bert.py:size=tiny,smoke"],
    "m2": ["--config=configs/m2_bert.py:size=tiny,smoke"],
}


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def pretrain_then_glue(tmp_path, glue_dir, family):
    pretrained, out = tmp_path / "pretrained", tmp_path / "glue"
    result = run("train.py", *FAMILIES[family], "--config.train.steps=2",
                 "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                 f"--workdir={pretrained}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("eval.py", "--config=configs/glue.py:smoke", f"--config.init={pretrained}",
                 f"--config.data_dir={glue_dir}", "--config.tasks=sst2",
                 "--config.max_steps=2", f"--workdir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    check_sst2_run(pretrained, glue_dir, out)


def check_sst2_run(pretrained, glue_dir, out):
    """The SST-2 fine-tune in `out` of the workdir `pretrained`: its table holds the accuracy
    of its own saved predictions, and it read and recorded the workdir's vocabulary."""
    recorded = pretrained / "tokenizer" / "spm.model"
    assert recorded.read_bytes() == vocab.EMBEDDED_MODEL_PATH.read_bytes()
    run_dir = out / "sst2" / "seed0"
    done = json.loads((run_dir / "result.json").read_text())
    scores = json.loads((run_dir / "dev" / f"step_{done['step']}.json").read_text())
    labels = glue.read(glue.TASKS["sst2"], ConfigDict({"data": {
        "format": "tsv", "data_dir": str(glue_dir), "max_train_examples": 0,
        "max_eval_examples": 16}}), "sst2").labels
    accuracy = metrics.accuracy(labels, scores["predictions"]["sst2"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"]["sst2"]["columns"]["sst2"]["accuracy"]["values"] == [
        pytest.approx(accuracy)]
    assert (run_dir / "tokenizer" / "spm.model").read_bytes() == recorded.read_bytes()


def test_pretrained_workdir_fine_tunes_on_glue(smoke_run, tmp_path, glue_files):
    """The seam in one process: the shared smoke pretraining run, fine-tuned by eval.py's runner
    (the command-line pairs for every encoder family are the slow test below)."""
    config = glue_config.get_config("smoke")
    config.init, config.data_dir = smoke_run[0], glue_files[0]
    config.tasks, config.max_steps = "sst2", 2
    runner.evaluate(config, str(tmp_path / "glue"))
    check_sst2_run(pathlib.Path(smoke_run[0]), glue_files[0], tmp_path / "glue")


@pytest.mark.slow  # a train.py + eval.py pair per family (~25-40 s each on 2 cores)
@pytest.mark.parametrize("family", ["bigs", "bert", "m2"])
def test_encoder_pretrain_then_glue(tmp_path, glue_files, family):
    pretrain_then_glue(tmp_path, glue_files[0], family)


def test_sentencepiece_model_where_a_vocabulary_is_expected(tmp_path, glue_files):
    spm = str(vocab.EMBEDDED_MODEL_PATH)
    renamed = tmp_path / "vocab.bin"          # told apart by content, not by name
    renamed.write_bytes(vocab.EMBEDDED_MODEL_PATH.read_bytes())
    texts = ["the cat sat on the mat ."]
    expected = vocab.embedded_vocabulary().encode(texts[0])
    for path in (spm, str(renamed)):
        config = ConfigDict({"init": "", "data": {"vocab_file": path, "lower_case": None}})
        v = finetune.vocabulary(config)
        assert vocab.special_ids(v) == vocab.embedded_special_ids()
        ids, _ = finetune.encode_examples(v, texts, None, 64)
        assert ids == [[2, *expected, 3]]       # [CLS] ... [SEP] of the embedded ids
    with pytest.raises(ValueError, match=r"^WordPiece vocab file .* is not UTF-8 text"):
        wordpiece.WordPieceVocabulary(spm)
    wp = tasks.load_vocabulary(glue_files[1])   # a vocab.txt stays WordPiece
    assert isinstance(wp, wordpiece.WordPieceVocabulary) and wp.special_ids.cls_id == 2


def test_workdir_vocabulary_is_found_by_the_python_api(smoke_run, tmp_path):
    workdir = smoke_run[0]
    assert vocab.workdir_vocabulary_file(workdir) == os.path.join(workdir, "tokenizer",
                                                                  "spm.model")
    v = tasks.load_vocabulary(workdir)
    assert v.encode("a cat") == vocab.embedded_vocabulary().encode("a cat")
    with pytest.raises(FileNotFoundError, match="records no vocabulary"):
        tasks.load_vocabulary(str(tmp_path))
    bare = tmp_path / "bare"                 # a workdir from before the vocabulary was recorded
    shutil.copytree(workdir, bare)
    shutil.rmtree(bare / "tokenizer")
    config = ConfigDict({"init": str(bare), "data": {"vocab_file": ""}})
    with pytest.raises(finetune.DataError, match=(
            f"^config.init {bare} records no vocabulary \\(no tokenizer/vocab.txt or "
            "tokenizer/spm.model or tokenizer/tokenizer.model or tokenizer/vocab.json\\); pass "
            "--config.vocab_file=")):
        finetune.vocabulary(config)
