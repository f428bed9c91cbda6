"""Mistakes a user can make that must stop with one line and change nothing on disk (issue 17,
items 1, 3 and 5): a directory that is not ours as workdir, token ids outside the vocabulary,
config typos and impossible values, a resume with changed settings."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import bigs_jax
from bigs_jax.data import registry
from bigs_jax.train import checkpointing, loop
from bigs_jax.train.config import check_values
from bigs_jax.train.workdir import check_workdir, eval_output
from configs import bert, quickstart
from tests.runs import smoke, snapshot
from tests.train.test_loop import run_cli


def hashes(path) -> dict:
    """{relative path: sha256} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(
                    fh.read()).hexdigest()
    return out


def hf_model_dir(path):
    """A directory laid out as an HF BERT checkpoint: config.json, weights, vocab."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    (path / "model.safetensors").write_bytes(os.urandom(256))
    (path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return path


# ---------------------------------------------------------------------------- item 1


def test_cli_refuses_a_foreign_workdir_and_leaves_it_byte_identical(tmp_path):
    foreign = hf_model_dir(tmp_path / "hf_bert")
    before = hashes(foreign)
    result = run_cli("--config=configs/quickstart.py:smoke", f"--workdir={foreign}")
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1] == (
        f"error: workdir {foreign} is not a bigs_jax run directory: it is not empty "
        "(config.json, model.safetensors, vocab.txt) and has no bigs_jax.json or run files of "
        "ours; nothing was written; pass an empty or new --workdir"), result.stderr
    assert "Traceback" not in result.stderr
    assert hashes(foreign) == before and sorted(os.listdir(foreign)) == sorted(before)


@pytest.mark.parametrize("layout,why", [
    ({"notes.txt": "mine"}, "not empty"),
    ({"model.json": "{not json"}, "not empty"),
    ({"model.json": json.dumps({"family": "llama", "config": {}})}, "not empty"),
    ({"config.json": json.dumps({"train": {}, "optim": {}})}, "not empty"),
    ({"bigs_jax.json": json.dumps({"bigs_jax": "eval", "format": 1})}, "'eval' directory"),
])
def test_train_loop_refuses_directories_that_are_not_ours(tmp_path, layout, why):
    workdir = tmp_path / "dir"
    workdir.mkdir()
    for name, text in layout.items():
        (workdir / name).write_text(text)
    before = hashes(workdir)
    with pytest.raises(loop.ConfigError, match=f"is not a bigs_jax run directory: .*{why}"):
        loop.train_and_evaluate(smoke(2), str(workdir))
    assert hashes(workdir) == before


def test_eval_output_of_someone_else_is_refused(tmp_path):
    foreign = hf_model_dir(tmp_path / "hf_bert")
    before = hashes(foreign)
    with pytest.raises(loop.ConfigError, match="not a bigs_jax eval directory"):
        check_workdir(str(foreign), "eval")
    assert hashes(foreign) == before


def test_a_failed_evaluation_gives_its_output_directory_back(tmp_path):
    """eval.py's output claim (`eval_output`) is undone when the evaluation fails before
    writing anything else there; an output already ours, or one a run wrote into, stays."""
    marker = checkpointing.MARKER_JSON

    def fail(out: str):
        with pytest.raises(RuntimeError, match="init is damaged"):
            with eval_output(out) as claimed:
                assert os.listdir(claimed) == [marker]
                raise RuntimeError("init is damaged")

    fresh = tmp_path / "new" / "out"
    fail(str(fresh))
    assert not fresh.exists() and (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    fail(str(empty))
    assert os.listdir(empty) == []
    ours = tmp_path / "ours"
    with eval_output(str(ours)):
        pass
    before = hashes(ours)
    fail(str(ours))
    assert hashes(ours) == before and os.listdir(ours) == [marker]
    written = tmp_path / "written"
    with pytest.raises(RuntimeError):
        with eval_output(str(written)) as out:
            (written / "task").mkdir()
            raise RuntimeError(out)
    assert sorted(os.listdir(written)) == sorted([marker, "task"])


def test_our_workdirs_old_and_new_are_recognised(smoke_run, tmp_path):
    workdir = smoke_run[0]
    marker = json.load(open(os.path.join(workdir, checkpointing.MARKER_JSON)))
    assert marker == {"bigs_jax": "run", "format": checkpointing.WORKDIR_FORMAT}
    assert check_workdir(workdir) == workdir
    old = tmp_path / "old"  # written before the marker existed
    shutil.copytree(workdir, old)
    os.remove(old / checkpointing.MARKER_JSON)
    assert check_workdir(str(old)) == str(old)
    os.remove(old / checkpointing.MODEL_JSON)  # killed between config.json and model.json
    assert check_workdir(str(old)) == str(old)
    eval_out = tmp_path / "eval_out" / "sst2"  # an old eval.py output holding one run
    shutil.copytree(workdir, eval_out / "seed0")
    os.remove(eval_out / "seed0" / checkpointing.MARKER_JSON)
    assert check_workdir(str(eval_out.parent), "eval") == str(eval_out.parent)
    (tmp_path / "empty").mkdir()
    assert check_workdir(str(tmp_path / "empty")) == str(tmp_path / "empty")


def test_a_workdir_that_cannot_be_created_is_refused_before_any_work(tmp_path):
    """/proc passes a permission check for root but creates nothing: the workdir check must
    find that out itself (before, train.py built the model and failed ~20 s later with a bare
    "[Errno 2]"), and leave nothing behind where the probe succeeds."""
    with pytest.raises(loop.ConfigError, match=(
            r"^workdir /proc/bigs_jax_test/run (cannot be created under /proc \(No such file "
            r"or directory\)|is not writable \(/proc denies writes\)); pass a writable "
            r"--workdir$")):
        check_workdir("/proc/bigs_jax_test/run")
    assert check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_a_damaged_marker_is_refused_not_trusted(smoke_run, tmp_path, text):
    """A bigs_jax.json that is not a JSON object: one line, nothing changed (the run files
    beside it must not vouch for it)."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run[0], workdir)
    (workdir / checkpointing.MARKER_JSON).write_text(text)
    before = hashes(workdir)
    with pytest.raises(loop.ConfigError, match=(
            rf"^workdir {workdir} has a damaged bigs_jax.json \(not a JSON object\); nothing "
            r'was written; if the directory is ours, write \{"bigs_jax": "run", "format": 1\} '
            r"into it, else pass an empty or new --workdir$")):
        loop.train_and_evaluate(smoke(4), str(workdir))
    assert hashes(workdir) == before


# ---------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("name", ["bigs-tiny", "gpt2-tiny"])
def test_model_call_rejects_ids_outside_the_vocabulary(name):
    model = bigs_jax.create(name, num_layers=1)  # the check runs before the layers
    vocab_size = model.config.vocab_size
    ids = np.array([[5, vocab_size, vocab_size + 7, 3]], np.int32)
    with pytest.raises(ValueError, match=rf"input_ids hold 2 ids outside the vocabulary, in "
                       rf"\[{vocab_size}, {vocab_size + 7}\]; the model's vocab_size is "
                       rf"{vocab_size} \(ids 0..{vocab_size - 1}\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"1 ids outside the vocabulary, in \[-1, -1\]"):
        model(np.array([[5, -1, 3, 3]], np.int32))
    out = model(np.array([[5, 6, vocab_size - 1, 0]], np.int32))
    assert np.isfinite(np.asarray(out.logits)).all()


def test_data_check_names_the_batch_and_range():
    ids = np.array([[2, 9, 40000], [-3, 4, 5]], np.int32)
    with pytest.raises(loop.ConfigError, match=r"^eval batch 0 has input_ids outside the "
                       r"model's vocabulary: 2 ids in \[-3, 40000\], but vocab_size is 8192 "
                       r"\(ids 0\.\.8191\)"):
        registry.check_token_ids({"input_ids": ids}, 8192, "eval batch 0")
    batches = registry.checked_batches(iter([{"input_ids": ids[:, :2] + 3}] * 2), 8192, 4)
    assert len(list(batches)) == 2
    with pytest.raises(loop.ConfigError, match="train batch of step 5 "):
        next(registry.checked_batches(iter([{"input_ids": ids}]), 8192, 4))


@pytest.mark.parametrize("name", ["bigs-tiny", "bert-tiny", "m2-bert-tiny"])
def test_model_call_rejects_token_types_outside_the_table(name):
    model = bigs_jax.create(name, num_layers=1)
    ids = np.array([[5, 6, 7, 3]], np.int32)
    with pytest.raises(ValueError, match=r"^token_type_ids hold 1 ids outside the token types, "
                       r"in \[2, 2\]; the model's type_vocab_size is 2 \(ids 0\.\.1\); use 0 "):
        model(ids, token_type_ids=np.array([[0, 0, 1, 2]], np.int32))
    with pytest.raises(ValueError, match=r"in \[-1, -1\]"):
        model(ids, token_type_ids=np.array([[0, -1, 1, 1]], np.int32))
    out = model(ids, token_type_ids=np.array([[0, 0, 1, 1]], np.int32))
    assert np.isfinite(np.asarray(out.logits)).all()


@pytest.mark.parametrize("name", ["bigs-tiny", "gpt2-tiny", "m2-bert-tiny"])
def test_model_call_rejects_per_token_inputs_of_another_shape(name):
    model = bigs_jax.create(name, num_layers=1)
    ids = np.array([[5, 6, 7, 3], [1, 2, 3, 4]], np.int32)
    for mask in (np.ones((2, 5), np.int32), np.ones((4,), np.int32), np.ones((1, 4), np.int32)):
        with pytest.raises(ValueError, match=rf"^attention_mask has shape \({mask.shape[0]},"
                           rf".*but input_ids is \[batch, length\] = \(2, 4\); pass one "
                           r"attention_mask value per token, shape \(2, 4\)$"):
            model(ids, attention_mask=mask)
    assert model(ids, attention_mask=np.ones((2, 4), np.int32)).logits.shape[0] == 2


def test_generate_rejects_a_mask_of_another_shape():
    model = bigs_jax.create("gpt2-tiny", num_layers=1)
    with pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 3\) but prompt_ids "
                       r"has shape \(2, 4\); pass one mask value per prompt token$"):
        bigs_jax.generate(model, np.ones((2, 4), np.int32), max_new_tokens=1,
                          attention_mask=np.ones((2, 3), np.int32))


def test_data_check_covers_labels_and_token_types():
    ids = np.array([[2, 9, 4], [3, 4, 5]], np.int32)
    with pytest.raises(loop.ConfigError, match=r"^batch 3 has labels outside the model's "
                       r"vocabulary: 1 ids in \[9000, 9000\], but vocab_size is 8192 \(ids "
                       r"0\.\.8191\); tokenize"):
        registry.check_token_ids({"input_ids": ids, "labels": ids * 1000}, 8192, "batch 3")
    with pytest.raises(loop.ConfigError, match=r"^batch 3 has token_type_ids outside the "
                       r"model's token types: 4 ids in \[2, 7\], but type_vocab_size is 2 "
                       r"\(ids 0\.\.1\); give segment ids"):
        registry.check_token_ids({"input_ids": ids, "token_type_ids": ids - 2}, 8192,
                                 "batch 3", 2)
    good = {"input_ids": ids, "labels": ids, "token_type_ids": ids % 2}
    assert registry.check_token_ids(good, 8192, "batch 3", 2) is good
    # a model without a token-type table (type_vocab_size 0) ignores token_type_ids
    assert registry.check_token_ids(good, 8192, "batch 3", 0) is good
    # sequence-level labels are no token ids: STS-B scores (negative once standardised),
    # class ids per row
    for labels in (np.array([-1.8, 0.4], np.float32), np.array([1, 0], np.int32)):
        batch = {"input_ids": ids, "labels": labels}
        assert registry.check_token_ids(batch, 16, "batch 3") is batch
    with pytest.raises(loop.ConfigError, match=r"^batch 3 has labels outside"):
        registry.check_token_ids({"input_ids": ids, "labels": ids + 8}, 16, "batch 3")


def test_train_loop_refuses_data_from_a_larger_vocabulary(tmp_path):
    config = smoke(2)
    config.model.vocab_size = 1000  # the embedded corpus has 8192 ids
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.ConfigError, match=r"eval batch 0 has input_ids outside the model's "
                       r"vocabulary: \d+ ids in \[1000, \d+\], but vocab_size is 1000"):
        loop.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------- item 5


def test_config_arguments_are_checked_against_each_config():
    with pytest.raises(ValueError, match=r"unknown config argument 'smok' in 'smok'; valid: "
                       r"smoke"):
        quickstart.get_config("smok")
    with pytest.raises(ValueError, match=r"unknown config argument 'sise' in 'sise=tiny'; "
                       r"valid: size, seq_len, smoke"):
        bert.get_config("sise=tiny")
    assert bert.get_config("size=tiny,seq_len=64,smoke").data.seq_len == 64


def test_impossible_values_are_refused_before_anything_is_written(tmp_path):
    config = smoke(2)
    config.train.steps = -5
    config.optim.lr = -1e-3
    config.data.batch_size = 0
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.ConfigError) as e:
        loop.train_and_evaluate(config, workdir)
    assert str(e.value) == (
        "impossible config values: config.train.steps=-5 (must be >= 1); "
        "config.data.batch_size=0 (must be >= 1); config.optim.lr=-0.001 (must be >= 0); "
        "pass values in range with --config.<section>.<key>=...")
    assert not os.path.exists(workdir)


def test_a_batch_that_does_not_split_into_microbatches_is_refused(tmp_path):
    """Found by tests/probe_bad_inputs.py: it was a ValueError traceback from inside the
    traced step, after the workdir was checked."""
    config = smoke(2)
    config.train.grad_accum_steps = 3  # batch 8
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.ConfigError, match=(
            r"^impossible config values: config.data.batch_size=8 is not divisible by "
            r"config.train.grad_accum_steps=3; ")):
        loop.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)
    config.train.grad_accum_steps = 4
    check_values(config)  # 8 = 4 x 2: accepted


def test_resume_with_changed_settings_refuses_or_records(smoke_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], workdir)  # a finished smoke(2) run
    before = snapshot(workdir)
    config = smoke(4)
    config.optim.lr = 1e-2
    config.data.batch_size = 4
    with pytest.raises(loop.ConfigError) as e:
        loop.train_and_evaluate(config, workdir)
    assert str(e.value) == (
        f"workdir {workdir} holds a run trained with other settings (data.batch_size 8 -> 4, "
        "optim.lr 0.005 -> 0.01); nothing was written; use a new --workdir, the original "
        "values, or --config.train.allow_config_change=True to continue with the new ones "
        "(recorded in config_history.json)")
    assert snapshot(workdir) == before

    config.data.batch_size = 8
    config.train.allow_config_change = True
    assert loop.train_and_evaluate(config, workdir)["steps"] == 4
    with open(os.path.join(workdir, "config_history.json")) as f:
        (entry,) = json.load(f)["changes"]
    assert entry["changed"] == {"optim.lr": [0.005, 0.01], "train.steps": [2, 4],
                                "train.allow_config_change": [False, True]}
    with open(os.path.join(workdir, checkpointing.CONFIG_JSON)) as f:
        assert json.load(f)["optim"]["lr"] == 1e-2
