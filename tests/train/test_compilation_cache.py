"""`train.compilation_cache_dir`: jax's persistent compilation cache at a directory of the
user's. A program compiled once is loaded, not compiled, by a later process (a rerun, a resume,
a preempted job's restart): the cache gains entries on the first run and none on the second."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from bigs_jax.errors import ConfigError
from bigs_jax.train import loop
from tests.runs import ROOT


def entries(directory) -> set:
    return {f for f in os.listdir(directory) if f.endswith("-cache")} if os.path.isdir(
        directory) else set()


def make_step():
    def step(x_N):
        return jnp.cumsum(jnp.sin(x_N) * 3.0 + x_N)
    return step


@pytest.fixture
def restore_jax_cache():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_a_program_compiled_once_is_loaded_from_the_cache(tmp_path, restore_jax_cache):
    cache = str(tmp_path / "xla")
    events = []
    listener = lambda name, **kwargs: events.append(name)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        loop.use_compilation_cache(cache)
        x = np.linspace(0.0, 1.0, 13, dtype=np.float32)
        first = jax.jit(make_step())(x)
        written = entries(cache)
        hits_before = events.count("/jax/compilation_cache/cache_hits")
        # A new function object: traced and lowered again, its executable read from disk.
        second = jax.jit(make_step())(x)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert len(written) == 1
    assert entries(cache) == written
    assert events.count("/jax/compilation_cache/cache_hits") == hits_before + 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_an_unsupported_cache_scheme_is_one_line(restore_jax_cache):
    with pytest.raises(ConfigError, match=r"^config.train.compilation_cache_dir memory://x: "
                                          r"memory:// paths are not supported"):
        loop.use_compilation_cache("memory://x")


@pytest.mark.slow
def test_a_second_identical_run_compiles_nothing(tmp_path):
    cache = str(tmp_path / "xla")
    counts = []
    for run in ("first", "second"):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"),
             f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}:smoke",
             f"--workdir={tmp_path / run}", "--config.train.steps=2",
             f"--config.train.compilation_cache_dir={cache}"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
            text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        counts.append(entries(cache))
    assert len(counts[0]) >= 3  # at least the init, train and eval steps
    assert counts[1] == counts[0]
