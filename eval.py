"""GLUE / SCROLLS fine-tuning and scoring of a pretrained workdir or converted checkpoint.

    python eval.py --config=configs/glue.py --config.init=WORKDIR --workdir=OUT \
        --config.tasks=sst2,stsb --config.seeds=0,1,2
    python eval.py --config=configs/scrolls.py --config.init=WORKDIR --workdir=OUT

Every task and seed fine-tunes through the train loop in OUT/<task>/seed<k>; OUT/results.json,
OUT/results.md and OUT/tb hold the scores (bigs_jax/evals/runner.py). Rerunning the same command
resumes an interrupted run and reuses finished ones.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text or type(e).__name__


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(HERE, "configs", "glue.py"), "evaluation config file",
        lock_config=True)
except (KeyError, AttributeError) as _e:
    fail(f"unknown config key in a --config.* flag: {_one_line(_e)}; see the config file's keys")
except (TypeError, ValueError, OSError, flags.Error) as _e:
    fail(f"bad --config or --config.* flag: {_one_line(_e)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: workdirs/eval)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a "
                                   "multi-process run (as train.py)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..n-1")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "join a multi-host run by JAX's cluster "
                                "detection (TPU pods, SLURM)")


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_one_line(e))
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        fail(f"bad --config or --config.* flag: {_one_line(e)}")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE")
    config = _CONFIG.value
    try:
        config.get("benchmark")
    except OSError as e:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        fail(f"could not load --config {path}: {str(e).strip().splitlines()[-1].strip()}")
    from bigs_jax.evals import runner
    from bigs_jax.evals.finetune import DataError
    from bigs_jax.train import partitioning
    from bigs_jax.train.loop import ConfigError

    try:
        partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                            _PROCESS_ID.value, 300, force=_MULTIHOST.value)
    except RuntimeError as e:
        fail(str(e), 1)

    try:
        summary = runner.evaluate(config, _WORKDIR.value or os.path.join("workdirs", "eval"))
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        fail(str(e), 1)
    if summary is None:
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
