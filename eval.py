"""GLUE / SCROLLS fine-tuning and scoring of a pretrained workdir or converted checkpoint.

    python eval.py --config=configs/glue.py --config.init=WORKDIR --workdir=OUT \
        --config.tasks=sst2,stsb --config.seeds=0,1,2
    python eval.py --config=configs/scrolls.py --config.init=WORKDIR --workdir=OUT
    python eval.py --config=configs/fpt.py --config.init=WORKDIR --workdir=OUT   # FPT protocol

Every task and seed fine-tunes through the train loop in OUT/<task>/seed<k>; OUT/results.json,
OUT/results.md and OUT/tb hold the scores (bigs_jax/evals/runner.py). Rerunning the same command
resumes an interrupted run and reuses finished ones.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from bigs_jax import cli
from bigs_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = cli.define_config(os.path.join(HERE, "configs", "glue.py"), "evaluation config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: workdirs/eval)")
_DISTRIBUTED = cli.define_distributed_flags()


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE")
    config = _CONFIG.value
    cli.check_config_loads(config, "benchmark")
    # Imported after flag parsing (seconds of TensorFlow), so a mistyped flag fails at once.
    from bigs_jax.evals import runner
    from bigs_jax.evals.finetune import DataError

    cli.join_distributed(_DISTRIBUTED)
    if config.get("benchmark") == "fpt":  # configs/fpt.py: the FPT protocol
        from bigs_jax.evals import fpt as runner
    try:
        summary = runner.evaluate(config, _WORKDIR.value or os.path.join("workdirs", "eval"))
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        cli.fail(str(e), 1)
    if summary is None:
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
