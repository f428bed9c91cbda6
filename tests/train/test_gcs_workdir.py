"""A workdir on GCS (issue 16): train.py trains into gs://bucket/run and a second process
resumes there, with Orbax's arrays (TensorStore), its step directories and commit files
(etils.epath), config.json / model.json / the marker / tokenizer/ and the TensorBoard events
(tf.io.gfile) and jax's compilation cache all in the bucket and nothing on the local disk; the final parameters, read back
with `bigs_jax.load("gs://...")`, equal bit for bit those of the same run trained straight
through in a local workdir.

The bucket is tests/fake_gcs.py's in-memory server: every client reaches it over HTTP the way
it reaches GCS, so the code under test is the production one, offline.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bigs_jax import fs
from bigs_jax.train import loop
from tests.runs import ROOT, params_of, smoke
from tests.train.test_sharding import run_two_processes, streaming_overrides

RUN = "gs://bucket/run"
# tests.runs.smoke(steps) as flags.
FLAGS = ["--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=2"]
CACHE = "gs://bucket/xla"  # the compilation cache, in the bucket too


def train(steps: int, cwd) -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}:smoke", f"--workdir={RUN}",
         f"--config.train.steps={steps}", f"--config.train.compilation_cache_dir={CACHE}",
         *FLAGS],
        cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_and_resume_on_gcs_equal_a_local_run(gcs, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    first = train(4, cwd)
    assert "fresh start, training to step 4" in first
    assert f"checkpoints [2, 4] in {RUN}" in first
    cached = {n for n in gcs.names("bucket") if n.startswith("xla/") and n.endswith("-cache")}
    assert cached  # jax wrote its compiled programs to the bucket
    second = train(6, cwd)
    assert "resuming from step 4, training to step 6" in second
    assert f"checkpoints [2, 4, 6] in {RUN}" in second
    assert list(cwd.iterdir()) == []  # nothing was written locally
    assert cached <= set(gcs.names("bucket"))  # the resume kept them (and added its own)

    names = gcs.names("bucket")
    for name in ("run/bigs_jax.json", "run/config.json", "run/model.json",
                 "run/config_history.json", "run/tokenizer/spm.model",
                 "run/checkpoints/6/commit_success.txt"):  # Orbax's GCS commit marker
        assert name in names, name
    assert any(n.startswith("run/checkpoints/6/params/") and "/d/" in n for n in names)
    events = [n for n in names if n.startswith("run/tb/events.out.tfevents.")]
    assert len(events) == 2 and all(gcs.read("bucket", n) for n in events)
    assert json.loads(gcs.read("bucket", "run/config.json"))["train"]["steps"] == 6

    local = str(tmp_path / "local")
    loop.train_and_evaluate(smoke(6), local)
    on_gcs, straight = params_of(RUN), params_of(local)
    assert len(on_gcs) == len(straight)
    for a, b in zip(on_gcs, straight):
        np.testing.assert_array_equal(a, b)
    assert fs.read_json(fs.join(RUN, "model.json")) == fs.read_json(fs.join(local, "model.json"))


@pytest.mark.slow  # three two-process runs
def test_two_hosts_train_and_resume_on_gcs(gcs, tmp_path):
    """Two processes × 4 devices (gloo) share one gs:// workdir, as the workers of a pod slice
    do: the run's files and checkpoints land once in the bucket, each host's input position
    too, nothing lands in a local `gs:` folder, and a pair resumed from the bucket at step 4
    continues with the losses of a pair trained straight to 6."""
    overrides = streaming_overrides(tmp_path / "corpus")
    straight = run_two_processes("bert-tiny", "8,1,1", 6, "gs://bucket/straight", overrides)
    run_two_processes("bert-tiny", "8,1,1", 4, RUN, overrides)
    names = gcs.names("bucket")
    for name in ("run/bigs_jax.json", "run/config.json", "run/model.json",
                 "run/checkpoints/4/commit_success.txt",
                 "run/checkpoints/4/data/process_0-of-2", "run/checkpoints/4/data/process_1-of-2"):
        assert name in names, name
    resumed = run_two_processes("bert-tiny", "8,1,1", 6, RUN, overrides)
    for got, want in zip(resumed, straight, strict=True):
        assert "resuming from step 4" in got["stdout"] and "replaying" not in got["stdout"]
        np.testing.assert_array_equal(got["losses"], want["losses"][4:])
    assert "run/checkpoints/6/commit_success.txt" in gcs.names("bucket")
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # no local stand-in for the bucket
