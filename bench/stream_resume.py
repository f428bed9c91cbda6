"""Streaming resume: restoring the saved input position vs replaying the consumed rows.

    python bench/stream_resume.py [--steps 20,200] [--batch 64] [--repeats 3]

The wikitext-2 test split (../shared/data) in 8 text files, streamed as BERT MLM rows of 128
tokens (embedded vocabulary, shuffle buffer 10,000 as in training). For each k, a stream runs
k batches and its position is saved into a real checkpoint step (`Checkpointer.save`, with
tiny params); then, side by side in this process, the time from a new iterator at step k to
its first batch:

- restore: `loop.resume_input` reads the position back from the checkpoint and restores it
  (what a resumed `train.py` does now);
- replay: the iterator replays and skips the first k * batch rows (what it did before, and
  still does for a checkpoint without a position).

Both yield the same batch (checked). Medians of `repeats` timed runs after one warm-up. The
`save s` column is what every checkpoint pays for it: `StreamIterator.state()` (the loop's
thread serializes the position; Orbax writes it in the background).
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import platform
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py)

from bigs_jax.data import streaming  # noqa: E402
from bigs_jax.train import checkpointing, loop  # noqa: E402

SPLIT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
L, FILES = 128, 8


def corpus(root: str) -> str:
    """The wikitext-2 test split's paragraphs in FILES files; the task spec streaming them."""
    lines = [x for x in (SPLIT / "wiki.test.raw").read_text().splitlines() if x.strip()]
    for f in range(FILES):
        pathlib.Path(root, f"train-{f}.txt").write_text("\n".join(lines[f::FILES]) + "\n")
    return f"text_mlm:train={root}/train-*.txt,validation={root}/train-0.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="20,200")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench_stream_resume_")
    task = corpus(root)
    kw = dict(split="train", batch_size=args.batch, seq_len=L, seed=0)
    ckpt = checkpointing.Checkpointer(os.path.join(root, "run"), keep=100)
    params = {"w": np.zeros(4, np.float32)}
    print(f"# {platform.node()}, {os.cpu_count()} CPUs; wikitext-2 test split in {FILES} files,"
          f" MLM rows of {L} tokens, host batch {args.batch}, shuffle buffer 10,000")
    print(f"{'k':>6} {'rows':>8} {'state MB':>9} {'save s':>7} {'replay s':>9} "
          f"{'restore s':>10} {'replay/restore':>15}")
    for k in (int(x) for x in args.steps.split(",")):
        it = streaming.make_stream_iterator(task, **kw)
        list(itertools.islice(it, k))
        state = it.state()
        t_save = median_time(it.state, args.repeats)
        expected = next(it)
        ckpt.save(k, params, params, {"step": k}, force=True, data_state=state)
        ckpt.wait()

        def restore():
            resumed = streaming.make_stream_iterator(task, start_step=k, **kw)
            loop.resume_input(resumed, ckpt, k)
            return next(resumed)

        def replay():
            return next(streaming.make_stream_iterator(task, start_step=k, **kw))

        for fn in (restore, replay):
            batch = fn()
            assert all(np.array_equal(batch[key], expected[key]) for key in expected), fn
        t_restore = median_time(restore, args.repeats)
        t_replay = median_time(replay, args.repeats)
        print(f"{k:>6} {k * args.batch:>8,} {len(state) / 2**20:>9.1f} {t_save:>7.2f} "
              f"{t_replay:>9.2f} {t_restore:>10.2f} {t_replay / t_restore:>15.1f}", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main()
