"""`python -m bigs_jax.data inspect --config=configs/X.py`: what the model will see.

    python -m bigs_jax.data inspect --config=configs/quickstart.py
    python -m bigs_jax.data inspect --config=configs/bert.py:size=tiny \
        --task='text_mlm:/data/wikitext-2/wiki.test.tokens,vocab=/path/vocab.txt,pack=1'

Builds the config's training stream exactly as `train.py` does (`config.data`: task, seq_len,
seed, mask_rate, whole_word, streaming, shuffle_buffer; `--streaming` sets streaming), prints
a few decoded rows (masked positions as [MASK]/{original}, segments split by ' | ') and token
statistics over `--batches` batches: row lengths, padding fraction, segments per row, and for
MLM the selection rate and its 80/10/10 split.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads below

import numpy as np  # noqa: E402

from bigs_jax.data import mixtures, pipeline, streaming, vocab  # noqa: E402


def _load_config(arg: str):
    path, _, config_arg = arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path} does not exist; pass a file in configs/.")
    spec = importlib.util.spec_from_file_location("_inspected_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg or None)


def _render(vocabulary, ids, labels, weights, segments) -> str:
    """One row as text: selected positions as [MASK]{orig} / ~new{orig} / ={orig}."""
    pieces = []
    for i, (t, y, w, s) in enumerate(zip(ids, labels, weights, segments, strict=True)):
        if t == 0:
            continue
        if i and s != segments[i - 1] and segments[i - 1] > 0:
            pieces.append("|")
        word = vocabulary.decode([int(t)])
        if w > 0 and labels is not None:
            orig = vocabulary.decode([int(y)])
            word = (f"{word}{{{orig}}}" if t != y else f"={{{orig}}}")
        pieces.append(word or f"<{int(t)}>")
    return " ".join(pieces)


def inspect(config, *, num_examples: int, num_batches: int) -> dict:
    """Prints decoded examples and statistics of `config.data`; returns the statistics."""
    d = config.data
    task = mixtures.get_task(d.task)
    first = task.tasks[0] if hasattr(task, "tasks") else task
    vocabulary = first.output_features["input_ids"].vocabulary
    specials = vocab.special_ids(vocabulary)
    is_mlm = "labels" not in first.output_features
    kw = dict(split="train", batch_size=d.batch_size, seq_len=d.seq_len, seed=d.seed,
              mask_rate=d.get("mask_rate", 0.15), whole_word=bool(d.get("whole_word", False)))
    if d.get("streaming"):
        it = streaming.make_stream_iterator(d.task, shuffle_buffer=d.get("shuffle_buffer",
                                                                         10_000), **kw)
    else:
        it = pipeline.make_iterator(d.task, **kw)
    batches = [next(it) for _ in range(num_batches)]
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    ids, weights = out["input_ids"], out["loss_weights"]
    segments = out.get("segment_ids", out["attention_mask"])
    per_epoch = ("streamed, rows per epoch unknown" if it.examples_per_epoch is None
                 else f"{it.examples_per_epoch} rows per epoch")
    print(f"task {d.task!r}: {'MLM' if is_mlm else 'causal LM'}, vocabulary "
          f"{type(vocabulary).__name__} ({specials.vocab_size} ids), seq_len {d.seq_len}, "
          f"{per_epoch}")
    for i in range(min(num_examples, len(ids))):
        labels = out["labels"][i] if is_mlm else None
        print(f"--- row {i}")
        print(_render(vocabulary, ids[i], labels, weights[i], segments[i]))
    real = out["attention_mask"] > 0
    lengths = real.sum(1)
    stats = {
        "rows": len(ids),
        "tokens": int(real.sum()),
        "length_mean": float(lengths.mean()),
        "length_min": int(lengths.min()),
        "length_max": int(lengths.max()),
        "padding_fraction": float(1 - real.mean()),
        "segments_per_row": float(segments.max(1).mean()),
    }
    if is_mlm:
        selected = weights > 0
        orig = np.where(selected, out["labels"], ids)
        selectable = ~np.isin(orig, specials.all)
        chosen, source = ids[selected], orig[selected]
        stats.update({
            "mask_rate": float(selected.sum() / max(selectable.sum(), 1)),
            "to_mask": float((chosen == specials.mask_id).mean()),
            "to_random": float(((chosen != source) & (chosen != specials.mask_id)).mean()),
            "kept": float((chosen == source).mean()),
            "unk_fraction": float((orig[real] == specials.unk_id).mean()),
        })
    print(f"--- statistics over {num_batches} batches of {d.batch_size} rows")
    for k, v in stats.items():
        print(f"  {k:18s} {v:.4f}" if isinstance(v, float) else f"  {k:18s} {v}")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bigs_jax.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print decoded examples and token statistics")
    p.add_argument("--config", required=True, help="configs/X.py[:arg]")
    p.add_argument("--task", help="override config.data.task (a name or a task spec)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the task (config.data.streaming=True), for large corpora")
    p.add_argument("--examples", type=int, default=3, help="rows to print")
    p.add_argument("--batches", type=int, default=4, help="batches for the statistics")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.examples < 0:
        parser.error(f"--batches must be >= 1 and --examples >= 0, got {args.batches} and "
                     f"{args.examples}")
    try:
        config = _load_config(args.config)
        if args.task:
            config.data.task = args.task
        if args.streaming:
            config.data.streaming = True
        inspect(config, num_examples=args.examples, num_batches=args.batches)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
