"""Pretraining and fine-tuning entry point.

    python train.py                                            # the quickstart run
    python train.py --config=configs/bigs.py:size=large --workdir=/path/to/run \
        --config.optim.lr=6e-4

Everything happens in `bigs_jax.train.loop.train_and_evaluate(config, workdir)`; this file only
parses flags and turns expected mistakes into one-line errors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF only feeds data; keep its chatter out

from absl import app, flags, logging
from ml_collections import config_flags

from bigs_jax import cli
from bigs_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = cli.define_config(os.path.join(HERE, "configs", "quickstart.py"),
                            "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config>)")
_DISTRIBUTED = cli.define_distributed_flags()


def default_workdir() -> str:
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE")
    config = _CONFIG.value
    cli.check_config_loads(config, "train")
    # Imported after the flags and the config file are checked: TensorFlow and the data stack
    # take seconds to load, and a mistyped flag or config path should fail at once. The
    # fine-tuning sources (`config.data.source` glue, scrolls) register when imported; the
    # loop itself registers only those of bigs_jax.data.
    from bigs_jax.evals import glue, scrolls  # noqa: F401
    from bigs_jax.train import loop

    cli.join_distributed(_DISTRIBUTED)
    try:
        loop.train_and_evaluate(config, _WORKDIR.value or default_workdir())
    except (ConfigError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        cli.fail(str(e), 1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
