"""Fault injection (issue 17, acceptance 2): SIGKILL a smoke run at seeded random points,
among them during the first save and during async checkpoint writes, damage the newest
checkpoint three ways in between, and rerun: the run ends with the uninterrupted run's final
parameters bit for bit, every damaged step kept in damaged_checkpoints/. With no intact
checkpoint left, a rerun ends with one `error:` line and changes nothing."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bigs_jax.train.checkpointing import DAMAGED, Checkpointer
from tests.runs import ROOT, params_of
from tests.train.test_damaged import DAMAGES
from tests.train.test_refusals import hashes

STEPS = 30
ARGS = ["--config=configs/quickstart.py:smoke", f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
        "--config.train.log_every=1", "--config.train.eval_every=1000"]
SEED = 17


class Run:
    """train.py in a subprocess, its output drained by a thread so the test can watch the
    checkpoint directory at the same time."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *ARGS,
                                      f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.out = b""
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.out += chunk

    def steps_logged(self) -> int:
        return self.out.count(b"loss=")

    def saving(self) -> bool:
        """An Orbax write in progress: a temporary step directory under checkpoints/."""
        try:
            return any("tmp" in name for name in os.listdir(self.workdir / "checkpoints"))
        except FileNotFoundError:
            return False

    def wait_for(self, condition, timeout=240.0) -> bool:
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > end:
                return False
            time.sleep(0.0005)
        return True

    def kill(self) -> bool:
        """SIGKILL; whether a checkpoint write was still open at that moment."""
        open_write = self.saving()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        return open_write

    def finish(self) -> int:
        rc = self.proc.wait(timeout=600)
        self.reader.join()
        return rc


def kill_points(rng: random.Random) -> list[tuple]:
    """The first save, then five seeded random points: (kind, steps past the start, delay)."""
    points = [("first_save", 0, 0.0)]
    kinds = ["save", "step", "save", "startup", "step"]
    rng.shuffle(kinds)
    for kind in kinds:
        points.append((kind, rng.randint(1, 3), round(rng.uniform(0.0, 0.3), 3)))
    return points


def kill_at(workdir, point) -> bool:
    """Start (or resume) the run and SIGKILL it at `point`; whether a write was open."""
    kind, past, delay = point
    run = Run(workdir)
    if kind == "startup":  # during imports, restore or compilation
        time.sleep(2.0 + 10 * delay)
    elif kind == "first_save":
        assert run.wait_for(run.saving), run.out.decode()[-2000:]
    else:
        assert run.wait_for(lambda: run.steps_logged() >= past), run.out.decode()[-2000:]
        if kind == "save":
            assert run.wait_for(run.saving), run.out.decode()[-2000:]
        else:
            time.sleep(delay)
    assert run.proc.poll() is None, f"finished before the kill at {point}"
    return run.kill()


@pytest.mark.slow  # ~10 train.py starts (~3-4 min on 2 cores)
def test_sigkill_at_random_points_and_damage_then_rerun(tmp_path):
    straight = tmp_path / "straight"
    assert Run(straight).finish() == 0
    expected = params_of(str(straight))

    workdir = tmp_path / "killed"
    rng = random.Random(SEED)
    damages = sorted(DAMAGES)           # truncated file, no _METADATA, no params/
    open_writes, damaged = 0, []
    for point in kill_points(rng):
        open_writes += kill_at(workdir, point)
        steps = Checkpointer(str(workdir)).all_steps()
        assert not steps or max(steps) < STEPS, (point, steps)
        moved = os.listdir(workdir / DAMAGED) if (workdir / DAMAGED).is_dir() else []
        # Damage the newest checkpoint, once the rerun has set the previous damage aside and
        # while an older intact one remains (a kill that left a single step behind is followed
        # by an undamaged rerun: with no intact step the rerun refuses, which
        # test_rerun_with_no_intact_checkpoint_is_one_line_and_changes_nothing covers).
        if damages and len(steps) >= 2 and len(moved) == len(damaged):
            how = damages.pop(0)
            DAMAGES[how][0](str(workdir / "checkpoints" / str(max(steps))))
            damaged.append((max(steps), how))
    assert open_writes >= 2, "no kill landed inside a checkpoint write"
    assert not damages, damages

    run = Run(workdir)
    assert run.finish() == 0, run.out.decode()[-3000:]
    for a, b in zip(params_of(str(workdir)), expected):
        np.testing.assert_array_equal(a, b)            # bit for bit
    kept = sorted(os.listdir(workdir / DAMAGED))
    assert len(kept) == len(damaged), (kept, damaged)  # every damaged step kept, none deleted


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_rerun_with_no_intact_checkpoint_is_one_line_and_changes_nothing(tmp_path, how):
    workdir = tmp_path / "run"
    run = Run(workdir)
    assert run.wait_for(lambda: run.steps_logged() >= 3)
    run.kill()
    steps = Checkpointer(str(workdir)).all_steps()
    for step in steps:
        DAMAGES[how][0](str(workdir / "checkpoints" / str(step)))
    before = hashes(workdir)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *ARGS,
                             f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith(f"error: no intact checkpoint in {workdir}/checkpoints: step "
                                f"{max(steps)}: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert hashes(workdir) == before
