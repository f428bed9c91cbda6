"""Tiny random-init workdirs (what `python -m bigs_jax.convert` writes) for end-to-end tests."""

import os
import shutil

from flax import nnx

import bigs_jax
from bigs_jax.models import make_config
from bigs_jax.train import checkpointing


def tiny_workdir(path, name: str, vocab_file: str, **overrides) -> str:
    """A workdir holding a random `name` model and `tokenizer/vocab.txt`."""
    config = make_config(name, **overrides)
    params = nnx.to_pure_dict(nnx.state(bigs_jax.build(config, seed=0)))
    path = str(path)
    checkpointing.save_params_only(path, 0, params)
    checkpointing.write_json_atomic(os.path.join(path, checkpointing.MODEL_JSON),
                                    checkpointing.model_json(config))
    os.makedirs(os.path.join(path, "tokenizer"))
    shutil.copyfile(vocab_file, os.path.join(path, "tokenizer", "vocab.txt"))
    return path
