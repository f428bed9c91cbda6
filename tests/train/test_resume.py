"""Exact resume: SIGKILL at several points (async saves in flight), rerun, same parameters;
also with the input streamed, whose position each checkpoint keeps (no replay on resume)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bigs_jax.train.checkpointing import Checkpointer
from tests.runs import ROOT, params_of

STEPS = 24
ARGS = ["--config=configs/quickstart.py:smoke", f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
        "--config.train.log_every=1", "--config.train.eval_every=1000"]


def start(workdir, extra=()):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *ARGS, *extra,
                             f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def run_until_killed(workdir, steps_past: int, extra=()):
    """Start (or resume) a run and SIGKILL it `steps_past` logged steps later."""
    proc = start(workdir, extra)
    seen = b""
    while seen.count(b"loss=") < steps_past and proc.poll() is None:
        seen += proc.stdout.read1(4096)
    proc.send_signal(signal.SIGKILL)  # checkpoint_every=1: an async save is almost surely open
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--config.data.streaming=True",
                                          "--config.data.shuffle_buffer=256")],
                         ids=["in_memory", "streaming"])
def test_sigkill_at_three_points_then_resume_is_bitwise_exact(tmp_path, extra):
    straight = tmp_path / "straight"
    assert subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *ARGS, *extra,
                           f"--workdir={straight}"], cwd=ROOT, capture_output=True).returncode == 0
    killed = tmp_path / "killed"
    for k in (2, 3, 4):
        run_until_killed(killed, k, extra)
        steps = Checkpointer(str(killed)).all_steps()
        assert steps and max(steps) < STEPS, steps  # only finished saves are visible
    last = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *ARGS, *extra,
                           f"--workdir={killed}"], cwd=ROOT, capture_output=True, text=True)
    assert last.returncode == 0 and "resuming from step" in last.stdout
    assert "replaying" not in last.stdout
    for a, b in zip(params_of(str(straight)), params_of(str(killed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
