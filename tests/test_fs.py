"""The workdir path layer (bigs_jax/fs.py): a gs:// URI is never made local, by any function of
the layer or by the workdir check, and every file lands in the bucket under the expected name
(tests/fake_gcs.py serves the bucket, reached through tf.io.gfile as in production); local
writes are whole or absent; an unsupported scheme is refused in one line."""

import json
import os

import numpy as np
import pytest

from bigs_jax import fs
from bigs_jax.data import tasks, vocab
from bigs_jax.errors import ConfigError
from bigs_jax.train import checkpointing
from bigs_jax.train.workdir import check_workdir
from tests.fake_gcs import FakeGCS

RUN = "gs://bucket/run"


@pytest.fixture(scope="module")
def gcs():
    server = FakeGCS()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.close()


def test_path_strings_keep_the_uri():
    assert fs.resolve(RUN) == RUN
    assert fs.resolve(RUN + "/") == RUN
    assert fs.join(RUN, "tokenizer", "spm.model") == "gs://bucket/run/tokenizer/spm.model"
    assert fs.dirname(RUN + "/checkpoints") == RUN
    assert fs.dirname("gs://bucket") == "gs://bucket"
    assert fs.basename(RUN + "/checkpoints/") == "checkpoints"
    assert fs.is_uri(RUN) and not fs.is_uri("/tmp/run")


def test_local_paths_are_expanded_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fs.resolve("runs/a") == str(tmp_path / "runs" / "a")
    assert fs.resolve("~/a") == str(tmp_path / "home" / "a")


def test_unsupported_scheme_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^workdir memory://run: memory:// paths are not "
                                          r"supported; use a local path or one of gs://"):
        check_workdir("memory://run")
    with pytest.raises(ValueError, match="memory:// paths are not supported"):
        fs.exists("memory://run/config.json")
    with pytest.raises(ConfigError, match=r"^workdir s3://bucket/run: Orbax writes checkpoints "
                                          r"to local paths and gs:// only"):
        check_workdir("s3://bucket/run")
    assert list(tmp_path.iterdir()) == []


def test_every_function_keeps_gs_paths_in_the_bucket(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path made local would appear here as gs:/bucket/run
    assert check_workdir(RUN) == RUN
    fs.makedirs(RUN)
    checkpointing.write_marker(RUN)
    fs.write_json(fs.join(RUN, "config.json"), {"b": 1, "a": [2]})
    fs.write_bytes(fs.join(RUN, "tokenizer", "spm.model"), vocab.EMBEDDED_MODEL_PATH.read_bytes())
    step = fs.join(RUN, "checkpoints", "4", "params")
    fs.write_text(fs.join(step, "_METADATA"), "{}")
    fs.copy(fs.join(step, "_METADATA"), fs.join(step, "copy"))

    assert check_workdir(RUN) == RUN  # ours now: the marker is read through the bucket
    assert gcs.read("bucket", "run/config.json") == b'{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert fs.read_json(fs.join(RUN, "config.json")) == {"a": [2], "b": 1}
    assert json.loads(gcs.read("bucket", "run/bigs_jax.json"))["bigs_jax"] == "run"
    assert fs.listdir(RUN) == ["bigs_jax.json", "checkpoints", "config.json", "tokenizer"]
    assert fs.isdir(fs.join(RUN, "tokenizer")) and not fs.isfile(fs.join(RUN, "tokenizer"))
    assert fs.isfile(fs.join(RUN, "config.json")) and fs.size(fs.join(step, "_METADATA")) == 2
    assert fs.glob(fs.join(RUN, "tokenizer", "*.model")) == [fs.join(RUN, "tokenizer",
                                                                     "spm.model")]
    walked = {root: sorted(files) for root, _, files in fs.walk(RUN)}
    assert walked[step] == ["_METADATA", "copy"]
    assert vocab.workdir_vocabulary_file(RUN) == fs.join(RUN, "tokenizer", "spm.model")

    # The damaged-checkpoint move: a directory of objects renamed under the bucket.
    assert checkpointing.set_aside(RUN, 4) == fs.join(RUN, "damaged_checkpoints", "4")
    assert not fs.exists(fs.join(RUN, "checkpoints", "4", "params", "_METADATA"))
    names = [n for n in gcs.names("bucket") if not n.endswith("/")]  # no directory markers
    assert names == ["run/bigs_jax.json", "run/config.json",
                     "run/damaged_checkpoints/4/params/_METADATA",
                     "run/damaged_checkpoints/4/params/copy", "run/tokenizer/spm.model"]

    fs.write_text(fs.join(RUN, "notes.txt"), "x")
    fs.rename(fs.join(RUN, "notes.txt"), fs.join(RUN, "moved.txt"))
    assert fs.read_text(fs.join(RUN, "moved.txt")) == "x"
    fs.rmtree(fs.join(RUN, "damaged_checkpoints"))
    assert not fs.exists(fs.join(RUN, "damaged_checkpoints"))
    assert list(tmp_path.iterdir()) == []  # nothing local, ever


def test_a_foreign_bucket_directory_is_refused(gcs):
    fs.write_text("gs://bucket/theirs/README", "not ours")
    with pytest.raises(ConfigError, match=r"workdir gs://bucket/theirs is not a bigs_jax run "
                                          r"directory: it is not empty \(README\)"):
        check_workdir("gs://bucket/theirs")


def test_a_bucket_without_access_is_one_line(gcs):
    with pytest.raises(ConfigError, match=r"^workdir gs://denied/run cannot be read \(.*403.*"
                                          r"\); check the bucket name and the credentials") as e:
        check_workdir("gs://denied/run")
    assert "\n" not in str(e.value)


def test_workdir_vocabulary_loads_from_the_bucket(gcs):
    run = "gs://bucket/vocab_run"
    fs.write_bytes(fs.join(run, "tokenizer", "spm.model"), vocab.EMBEDDED_MODEL_PATH.read_bytes())
    loaded, embedded = tasks.load_vocabulary(run), vocab.embedded_vocabulary()
    text = "Orbax writes the arrays; etils.epath the rest."
    np.testing.assert_array_equal(loaded.encode(text), embedded.encode(text))
    assert vocab.special_ids(loaded) == vocab.embedded_special_ids()


def test_local_writes_are_whole_or_absent(tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    fs.write_json(path, {"v": 1})

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        fs.write_json(path, {"v": 2})
    assert fs.read_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["config.json"]  # no temp file left behind
