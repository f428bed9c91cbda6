"""The quickstart smoke run that the training-loop tests share, readers of its workdir, and a
script runner on 8 forced CPU devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import bigs_jax
from configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def smoke(steps: int):
    """configs/quickstart.py:smoke for `steps` steps, evaluated and saved every 2 steps."""
    config = quickstart.get_config("smoke")
    config.train.steps = steps
    # A schedule independent of the run length: "train to 4, then continue to 6" must take
    # the same updates as "train to 6" (with warmup/decay the plan itself would differ).
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.train.checkpoint_every = 2
    config.train.eval_every = 2
    return config


def snapshot(path) -> dict:
    """{relative path: (size, mtime)} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def params_of(workdir, step=None) -> list[np.ndarray]:
    """The leaves of the model saved in `workdir` (latest step, or `step`)."""
    model = bigs_jax.load(workdir) if step is None else bigs_jax.load(workdir, step=step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def on_8_devices(script: str, timeout: int = 600):
    """The last stdout line, as JSON, of `python -c script` on 8 forced CPU devices (a mesh
    needs them at JAX's start, so the script runs in its own process)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
