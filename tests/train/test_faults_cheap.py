"""The cheap fixes of issue 17's table (acceptance 3): a non-finite value, a bad mesh, a
malformed workdir JSON, a model input of the wrong shape or dtype, an HF config.json that is
not an object, a checkpoint write that fails (a full disk): one line each, nothing changed."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import bigs_jax
from bigs_jax.convert.common import ConversionError, read_json
from bigs_jax.errors import CheckpointWriteError
from bigs_jax.train import checkpointing, loop
from tests.runs import ROOT, smoke
from tests.train.test_refusals import hashes


def test_non_finite_values_and_a_bad_mesh_are_refused(tmp_path):
    config = smoke(2)
    config.optim.lr = float("nan")
    with pytest.raises(loop.ConfigError, match=r"config.optim.lr=nan \(must be >= 0\)"):
        loop.train_and_evaluate(config, str(tmp_path / "a"))
    config = smoke(2)
    config.mesh.shape = (3, 5)
    with pytest.raises(loop.ConfigError, match=r"^config.mesh.shape \(3, 5\) must have 3 "
                                               r"entries \('data', 'fsdp', 'tensor'\)"):
        loop.train_and_evaluate(config, str(tmp_path / "b"))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name,text,message", [
    ("config.json", "{not json", "has a config.json that cannot be read as a JSON object; "
                                 "nothing was written"),
    ("model.json", "{not json", r"unreadable model.json \(.*model.json is not JSON"),
    ("model.json", "[1, 2]", r"unreadable model.json \(model.json is not a"),
])
def test_malformed_workdir_json_is_refused(smoke_run, tmp_path, name, text, message):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], workdir)
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)
    before = hashes(workdir)
    with pytest.raises(loop.ConfigError, match=message):
        loop.train_and_evaluate(smoke(4), workdir)
    assert hashes(workdir) == before


def test_model_inputs_of_the_wrong_shape_or_dtype():
    model = bigs_jax.create("bert-tiny", num_layers=1)
    for ids, got in ((np.ones((1, 8), np.float32), r"float32 of shape \(1, 8\)"),
                     (np.ones((8,), np.int32), r"int32 of shape \(8,\)")):
        with pytest.raises(ValueError, match=r"^input_ids must be integer token ids of shape "
                                             rf"\[batch, length\], got {got}"):
            model(ids)
    assert np.isfinite(np.asarray(model(np.ones((1, 8), np.int32)).hidden_states)).all()


def test_hf_config_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps([1]))
    with pytest.raises(ConversionError, match="holds a JSON list, not the object of a model "
                                              "config"):
        read_json(str(path))


def test_a_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch):
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)

    def full_disk(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "d/abc" in OCDBT database\n'
                         "[source locations='...']")

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        ckpt.save(1, {"w": np.zeros(2)}, {}, {})
    assert str(e.value) == (
        f"writing a checkpoint to {tmp_path}/checkpoints failed (RESOURCE_EXHAUSTED: Error "
        'writing "d/abc" in OCDBT database); there is no complete checkpoint yet; '
        "free space on that disk (or restore write access) and rerun the same command to "
        "resume")


def test_a_failed_parameter_write_is_one_line(tmp_path, monkeypatch):
    """Found by tests/probe_bad_inputs.py: convert on a full disk ended in Orbax's traceback."""
    def full_disk(*args, **kwargs):
        raise ValueError('OUT_OF_RANGE: Error writing "w/0" in OCDBT database\nmore')

    monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        checkpointing.save_params_only(str(tmp_path), 0, {"w": np.zeros(2)})
    assert str(e.value) == ('writing the parameters failed (OUT_OF_RANGE: Error writing "w/0" '
                            "in OCDBT database); free space on that disk (or restore write "
                            "access) and rerun")


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (a full disk as TensorStore's
    background writes meet it) instead of killing the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow  # a train.py process (~21 s); the in-process failed writes above stay default
def test_train_py_on_a_full_disk_ends_in_one_line(tmp_path):
    """The optimizer state (~2 MB) cannot be written: Orbax's background threads and the
    futures they leave report nothing of their own; the run ends in the one error line."""
    workdir = str(tmp_path / "run")
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/quickstart.py:smoke",
         f"--workdir={workdir}", "--config.train.steps=4"], cwd=ROOT, capture_output=True,
        text=True, preexec_fn=_file_size_limit(300_000), timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: writing a checkpoint to {workdir}/checkpoints failed "
                                "("), p.stderr[-3000:]
    assert lines[-1].endswith("; there is no complete checkpoint yet; free space on that disk "
                              "(or restore write access) and rerun the same command to resume")
    for noise in ("Traceback", "never retrieved", "raised an exception"):
        assert noise not in p.stderr, p.stderr[-3000:]
    # no step was completed: only Orbax's temporary directories, which a rerun ignores
    assert all(name.endswith(".orbax-checkpoint-tmp")
               for name in os.listdir(os.path.join(workdir, "checkpoints")))
