"""Damaged checkpoints (issue 17, item 2): a truncated file, a deleted `_METADATA` or a deleted
`params/` in the newest step is named in one line; `bigs_jax.load` lists the intact steps and
loads one on request; the train loop resumes from the newest intact step, moving the damaged
one to `damaged_checkpoints/` (kept byte for byte, out of reach of retention and of the save
that retrains its step)."""

import os
import shutil

import numpy as np
import pytest

import bigs_jax
from bigs_jax.errors import CheckpointReadError, DamagedCheckpoint
from bigs_jax.train import checkpointing, loop
from tests.runs import params_of, smoke
from tests.train.test_refusals import hashes

# A failed TensorStore read leaves coroutines that pytest reports when they are collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def truncate_largest(step_dir):
    """Halve the largest file under params/ (a TensorStore data file)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "params"))
             for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "params", "_METADATA"))


def delete_params(step_dir):
    shutil.rmtree(os.path.join(step_dir, "params"))


DAMAGES = {  # name -> (damage, the reason the message gives)
    "truncated": (truncate_largest, r"its files cannot be read \("),
    "no_metadata": (delete_metadata, r"params/_METADATA is missing"),
    "no_params": (delete_params, r"params/ is missing"),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished smoke(6) run: checkpoints 2, 4, 6, and the parameters of each."""
    workdir = str(tmp_path_factory.mktemp("damaged") / "straight")
    loop.train_and_evaluate(smoke(6), workdir)
    return workdir, {s: params_of(workdir, s) for s in (2, 4, 6)}


def damaged_copy(straight, tmp_path, how, keep=(2, 4)):
    """A copy of the straight run holding steps `keep`, its newest damaged `how`."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight[0], workdir)
    for step in {2, 4, 6} - set(keep):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    DAMAGES[how][0](os.path.join(workdir, "checkpoints", str(max(keep))))
    return workdir


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_load_names_the_damaged_step_and_the_intact_ones(straight, tmp_path, how):
    workdir = damaged_copy(straight, tmp_path, how)
    before = hashes(workdir)
    with pytest.raises(DamagedCheckpoint) as e:
        bigs_jax.load(workdir)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300 + 4 * len(workdir), message
    assert message.startswith(f"checkpoint step 4 in {workdir}/checkpoints is damaged: ")
    assert message.endswith(f"; intact steps: [2]; load an intact one with "
                            f"bigs_jax.load({workdir!r}, step=2)")
    assert e.value.step == 4
    pytest.raises(DamagedCheckpoint, bigs_jax.load, workdir, step=4)
    for a, b in zip(params_of(workdir, 2), straight[1][2]):   # the intact step, on request
        np.testing.assert_array_equal(a, b)
    assert hashes(workdir) == before


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_damage_is_named(straight, tmp_path, how):
    workdir = damaged_copy(straight, tmp_path, how)
    with pytest.raises(DamagedCheckpoint, match=DAMAGES[how][1]):
        bigs_jax.load(workdir)


def test_train_resumes_from_the_newest_intact_step_and_keeps_the_damaged_one(
        straight, tmp_path, capsys):
    workdir = damaged_copy(straight, tmp_path, "truncated")
    damaged = hashes(os.path.join(workdir, "checkpoints", "4"))
    summary = loop.train_and_evaluate(smoke(6), workdir)
    out = capsys.readouterr().out
    kept = os.path.join(workdir, checkpointing.DAMAGED, "4")
    assert ("warning: checkpoint step 4 is damaged (its files cannot be read (" in out
            and f"moved to {kept} (kept, not deleted); resuming from step 2" in out), out
    assert hashes(kept) == damaged                      # set aside byte for byte
    assert summary["checkpoints"] == [2, 4, 6]          # step 4 retrained and saved anew
    for a, b in zip(params_of(workdir), straight[1][6]):
        np.testing.assert_array_equal(a, b)             # as if nothing had happened


def test_train_refuses_when_no_checkpoint_is_intact(straight, tmp_path):
    workdir = damaged_copy(straight, tmp_path, "no_metadata", keep=(4,))
    before = hashes(workdir)
    with pytest.raises(DamagedCheckpoint, match=(
            f"no intact checkpoint in {workdir}/checkpoints: step 4: params/_METADATA is "
            "missing; nothing was changed; move the damaged step directories out of it")):
        loop.train_and_evaluate(smoke(6), workdir)
    assert hashes(workdir) == before


@pytest.mark.parametrize("cause", [
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
    RuntimeError("UNAVAILABLE: gcs: connection reset by peer"),
    PermissionError(13, "Permission denied", "params/d/0.0"),
    MemoryError()])
def test_a_passing_read_failure_is_not_damage(straight, tmp_path, monkeypatch, cause):
    """Out of memory, the network or permissions failing a read say nothing about the files:
    one line, and nothing is moved aside (a rerun reads the step again)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight[0], workdir)
    before = hashes(workdir)

    def failing_restore(*args, **kwargs):
        raise ValueError("Encountered error while reading array index (0,)") from cause

    monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", failing_restore)
    for run in (lambda: loop.train_and_evaluate(smoke(8), workdir),
                lambda: bigs_jax.load(workdir)):
        with pytest.raises(CheckpointReadError) as e:
            run()
        message = str(e.value)
        assert "\n" not in message, message
        assert message.startswith(
            f"reading checkpoint step 6 in {workdir}/checkpoints failed ("), message
        assert message.endswith("this is not damage to its files, so nothing was moved; free "
                                "memory or restore access and rerun the same command"), message
    assert hashes(workdir) == before
    assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED))


def test_a_damaged_init_is_refused_before_the_workdir_is_written(smoke_run, tmp_path):
    """Found by tests/probe_bad_inputs.py: eval.py (and train.py --config.init) wrote the run's
    config.json, model.json and tokenizer/ before reading the init checkpoint."""
    init = tmp_path / "init"
    shutil.copytree(smoke_run[0], init)
    shutil.rmtree(init / "checkpoints" / "2" / "params")
    before = hashes(init)
    config = smoke(2)
    config.init = str(init)
    with pytest.raises(loop.ConfigError, match=rf"^checkpoint step 2 in {init}/checkpoints is "
                                               r"damaged: params/ is missing"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    assert hashes(init) == before
