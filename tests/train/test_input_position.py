"""The input position a checkpoint keeps for a streamed input (issue 16): each process's bytes
are an Orbax item of the step (`checkpoints/<step>/data/process_<i>-of-<n>`), in a local or a
gs:// workdir, and `loop.resume_input` restores them, or replays with one line saying why."""

import itertools
import os

import numpy as np
import pytest

from bigs_jax import fs
from bigs_jax.data import streaming
from bigs_jax.train import checkpointing, loop

PARAMS = {"w": np.arange(4, dtype=np.float32)}


def _saved(workdir: str, positions: dict) -> checkpointing.Checkpointer:
    ckpt = checkpointing.Checkpointer(workdir, keep=10)
    for step, data in positions.items():
        ckpt.save(step, PARAMS, PARAMS, {"step": step}, force=True, data_state=data)
    ckpt.wait()
    return ckpt


def test_positions_are_per_process_items_of_their_step(tmp_path):
    ckpt = _saved(str(tmp_path / "run"), {2: b"two\n\x00\xff", 4: None})
    assert ckpt.restore_data_state(2) == b"two\n\x00\xff"
    assert ckpt.restore_data_state(4) is None  # saved without one
    names = os.listdir(tmp_path / "run" / "checkpoints" / "2" / "data")
    assert [n for n in names if n.startswith("process_")] == ["process_0-of-1"]
    # Another number of processes finds no file of its own.
    os.rename(tmp_path / "run" / "checkpoints" / "2" / "data" / "process_0-of-1",
              tmp_path / "run" / "checkpoints" / "2" / "data" / "process_0-of-2")
    assert ckpt.restore_data_state(2) is None
    ckpt.close()


def test_positions_are_written_into_a_gcs_step(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _saved("gs://bucket/run", {2: b"position"})
    assert gcs.read("bucket", "run/checkpoints/2/data/process_0-of-1") == b"position"
    assert ckpt.restore_data_state(2) == b"position"
    ckpt.close()
    assert list(tmp_path.iterdir()) == []


def test_resume_input_restores_or_replays_saying_why(tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    for f in range(2):
        (root / f"t{f}.txt").write_text("\n".join(f"doc {f} {i} " * (i % 7 + 1)
                                                  for i in range(40)))
    kw = dict(split="train", batch_size=4, seq_len=16, seed=0, shuffle_buffer=32)
    task = f"text_mlm:train={root}/t*.txt,validation={root}/t0.txt"
    it = streaming.make_stream_iterator(task, **kw)
    list(itertools.islice(it, 3))
    position = it.state()
    expected = next(it)
    ckpt = _saved(str(tmp_path / "run"), {3: position, 5: None, 6: position[:-50]})

    def resumed(step):
        out = streaming.make_stream_iterator(task, start_step=step, **kw)
        loop.resume_input(out, ckpt, step)
        return out, capsys.readouterr().out

    restored, out = resumed(3)
    batch = next(restored)
    assert out == "" and all(np.array_equal(v, batch[k]) for k, v in expected.items())
    assert loop.data_state(restored, 4) is not None
    with pytest.raises(RuntimeError, match="the train iterator is at step 4, not 3"):
        loop.data_state(restored, 3)
    _, out = resumed(5)
    assert out == ("data: checkpoint step 5 has no input position to restore (it holds none for "
                   "this process: saved by an older bigs_jax, or by another number of "
                   "processes); replaying the input's first 5 batches to resume there\n")
    _, out = resumed(6)
    assert "(it was saved at step 3, not 6); replaying" in out
    ckpt.close()
    assert fs.isdir(str(tmp_path / "run" / "checkpoints" / "6" / "data"))
