"""What train.py and eval.py share: one-line errors, the config flag, the multi-process flags.

Expected mistakes (a bad --config.* key, a missing config file, an unreachable coordinator)
end the process with one `error: ...` line on stderr instead of a traceback.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from bigs_jax.train import partitioning


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (ml_collections wraps KeyErrors in reprs, and an
    exception raised by a config file's get_config in the whole traceback: its last line is
    the message)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Error whilst parsing config file" in text and "Traceback" in text:
        head = text.split("Error whilst parsing config file", 1)[0]
        text = head + text.strip().splitlines()[-1].strip()
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text or type(e).__name__


def define_config(default_path: str, help_text: str):
    """`--config`, with mistakes in it or in its --config.* overrides as one line.

    ml_collections loads the config file and applies the overrides already here, while
    defining the flag; a bad key or a missing file surfaces as an exception.
    """
    try:
        return config_flags.DEFINE_config_file("config", default_path, help_text,
                                               lock_config=True)
    except (KeyError, AttributeError) as e:
        fail(f"unknown config key in a --config.* flag: {one_line(e)}; see the config file's "
             "keys")
    except (TypeError, ValueError, OSError, flags.Error) as e:
        fail(f"bad --config or --config.* flag: {one_line(e)}")


def define_distributed_flags() -> dict:
    """The flags that join a multi-process run; read them with `distributed_args`."""
    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0 for a multi-process run (not "
            "needed on TPU pods or SLURM, where JAX finds its peers)"),
        "num_processes": flags.DEFINE_integer("num_processes", None,
                                              "processes in a multi-process run"),
        "process_id": flags.DEFINE_integer("process_id", None, "this process's index, 0..n-1"),
        "multihost": flags.DEFINE_bool("multihost", False, "join a multi-host run by JAX's "
                                       "cluster detection (TPU pods, SLURM) even if it is not "
                                       "auto-detected"),
        "initialization_timeout": flags.DEFINE_integer(
            "initialization_timeout", 300, "seconds to wait for all processes to join"),
    }


def join_distributed(defined: dict) -> None:
    """Join the multi-process runtime the flags describe (a no-op for one process)."""
    try:
        partitioning.initialize_distributed(
            defined["coordinator_address"].value, defined["num_processes"].value,
            defined["process_id"].value, defined["initialization_timeout"].value,
            force=defined["multihost"].value)
    except RuntimeError as e:
        fail(str(e), 1)


def parse_flags(argv):
    """absl's parser, with flag mistakes (bad key, missing config file) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(one_line(e))
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        fail(f"bad --config or --config.* flag: {one_line(e)}")


def check_config_loads(config, key: str) -> None:
    """ml_collections defers a config file's load failure to the first access (of `key`)."""
    try:
        config.get(key)
    except OSError as e:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        fail(f"could not load --config {path}: {str(e).strip().splitlines()[-1].strip()}")
