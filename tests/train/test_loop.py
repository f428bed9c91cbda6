"""The train loop end to end on the smoke config: checkpoints, events, exact resume, errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bigs_jax.train import checkpointing, loop
from tests.runs import ROOT, params_of, smoke, snapshot


def test_train_writes_workdir_profiles_and_resumes_exactly(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    summary = loop.train_and_evaluate(smoke(6), straight)
    assert summary["steps"] == 6 and summary["checkpoints"] == [2, 4, 6]
    assert set(summary["eval_loss"]) == {0, 2, 4, 6}
    assert summary["eval_loss"][6] < summary["eval_loss"][0]
    assert os.path.exists(os.path.join(straight, "config.json"))
    assert checkpointing.read_model_config(straight).vocab_size == 8192
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{straight}/tb"))

    interrupted = smoke(4)                               # "interrupted" after step 4,
    interrupted.train.profile_start_step = 2             # with steps 2-3 traced, which must
    interrupted.train.profile_num_steps = 2              # change nothing of the training
    loop.train_and_evaluate(interrupted, split)
    traces = [f for _, _, files in os.walk(os.path.join(split, "profile")) for f in files
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1
    resumed = loop.train_and_evaluate(smoke(6), split)  # the same run, continued
    assert 0 not in resumed["eval_loss"]                # no re-init, no step-0 eval
    assert resumed["steps"] == 6 and resumed["checkpoints"] == [2, 4, 6]
    for a, b in zip(params_of(straight), params_of(split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_workdir_of_another_model_is_refused(smoke_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], workdir)  # a finished smoke(2) run
    before = snapshot(workdir)
    config = smoke(4)
    config.model.hidden_size = 32
    with pytest.raises(loop.ConfigError, match="different model.*hidden_size"):
        loop.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--config.model.nme=x"], "nme"),
    (["--config=configs/nope.py"], "nope.py"),
    (["--config.train.steps=abc"], "steps"),
    (["--config=configs/quickstart.py:smok"], "unknown config argument 'smok'"),
])
def test_cli_bad_flags_fail_in_one_line_and_touch_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("untouched")
    before = snapshot(workdir)
    result = run_cli(*args, f"--workdir={workdir}")
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(workdir) == before


def test_cli_unwritable_workdir(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/1/bigs_jax_run"  # root may write anywhere but here
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "run")
    result = run_cli("--config=configs/quickstart.py:smoke", f"--workdir={target}")
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: workdir") and "not writable" in lines[-1], result.stderr
    assert not os.path.exists(target)
