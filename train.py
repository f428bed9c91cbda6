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
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "configs", "quickstart.py"), "experiment config file",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config>)")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv):
    """absl's parser, with flag mistakes (bad key, missing config file) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except (FileNotFoundError, OSError) as e:
        fail(f"{e}; check the --config path")


def default_workdir() -> str:
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE")
    from bigs_jax.train import loop

    try:
        config = _CONFIG.value
    except Exception as e:  # config file that fails to load or whose get_config raises
        fail(f"could not load --config: {e}")
    try:
        loop.train_and_evaluate(config, _WORKDIR.value or default_workdir())
    except (loop.ConfigError, FileNotFoundError, FloatingPointError) as e:
        fail(str(e), 1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
