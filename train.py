"""Pretraining and fine-tuning entry point.

    python train.py                                            # the quickstart run
    python train.py --config=configs/bigs.py:size=large --workdir=/path/to/run \
        --config.optim.lr=6e-4

Everything happens in `bigs_jax.train.loop.train_and_evaluate(config, workdir)`; this file only
parses flags and turns expected mistakes into one-line errors.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF only feeds data; keep its chatter out

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (ml_collections wraps KeyErrors in reprs)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text or type(e).__name__


try:
    # ml_collections loads the config file and applies --config.* overrides already here,
    # while defining the flag; a bad key or a missing file surfaces as an exception.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(HERE, "configs", "quickstart.py"), "experiment config file",
        lock_config=True)
except (KeyError, AttributeError) as _e:
    fail(f"unknown config key in a --config.* flag: {_one_line(_e)}; see the config file's keys")
except (TypeError, ValueError, OSError, flags.Error) as _e:
    fail(f"bad --config or --config.* flag: {_one_line(_e)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config>)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (not needed on "
    "TPU pods or SLURM, where JAX finds its peers)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..n-1")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "join a multi-host run by JAX's cluster "
                                "detection (TPU pods, SLURM) even if it is not auto-detected")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300,
                                     "seconds to wait for all processes to join")


def parse_flags(argv):
    """absl's parser, with flag mistakes (bad key, missing config file) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_one_line(e))
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        fail(f"bad --config or --config.* flag: {_one_line(e)}")


def default_workdir() -> str:
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE")
    from bigs_jax.train import loop, partitioning

    try:
        partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                            _PROCESS_ID.value, _INIT_TIMEOUT.value,
                                            force=_MULTIHOST.value)
    except RuntimeError as e:
        fail(str(e), 1)

    config = _CONFIG.value
    try:
        config.get("train")  # ml_collections defers load failures to the first access
    except OSError as e:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        fail(f"could not load --config {path}: {str(e).strip().splitlines()[-1].strip()}")
    try:
        loop.train_and_evaluate(config, _WORKDIR.value or default_workdir())
    except (loop.ConfigError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        fail(str(e), 1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
