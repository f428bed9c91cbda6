"""The streaming input path (`data.streaming`): determinism, exact resume, disjoint host shards
that cover every document, BERT masking statistics, mixtures, tfds, and the train loop on it."""

import itertools
import json
import random
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bigs_jax.data import __main__ as inspect_cli
from bigs_jax.data import mixtures, pipeline, streaming, vocab

L = 32
SPECIALS = vocab.embedded_special_ids()
WORDS = ("river stone light north market garden quiet harbor winter copper lantern meadow "
         "signal orchard valley thunder").split()


def _documents(rng, count, prefix):
    return [f"{prefix} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
            for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 train files of 30 documents (text and the same as jsonl), one validation file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    train = [_documents(rng, 30, f"file{f}") for f in range(8)]
    for f, docs in enumerate(train):
        (root / f"train-{f}.txt").write_text("\n".join(docs) + "\n")
        (root / f"train-{f}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    validation = _documents(rng, 60, "held out")
    (root / "valid.txt").write_text("\n".join(validation) + "\n")
    return {
        "train": train, "validation": validation,
        "text": f"text_mlm:train={root}/train-*.txt,validation={root}/valid.txt",
        "jsonl": f"jsonl_mlm:train={root}/train-*.jsonl,validation={root}/valid.txt",
    }


def _take(task, n, **kw):
    kw = {"split": "train", "batch_size": 8, "seq_len": L, "seed": 0, "shuffle_buffer": 64,
          **kw}
    return list(itertools.islice(streaming.make_stream_iterator(task, **kw), n))


def _originals(batches):
    """[rows, L] unmasked ids of MLM batches."""
    ids = np.concatenate([b["input_ids"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    weights = np.concatenate([b["loss_weights"] for b in batches])
    return np.where(weights > 0, labels, ids)


def _documents_of(rows):
    """Token ids of each document of an unshuffled MLM stream: rows are [CLS] chunk [SEP]
    with the chunks cut from the documents' ids, each followed by [SEP]."""
    lengths = (rows != 0).sum(1)
    stream = np.concatenate([r[1:n - 1] for r, n in zip(rows, lengths, strict=True) if n])
    ends = np.flatnonzero(stream == SPECIALS.sep_id)
    docs = np.split(stream, ends + 1)
    return [tuple(int(t) for t in d[:-1]) for d in docs[:-1]], docs[-1]


def _token_counts(rows):
    real = rows[~np.isin(rows, SPECIALS.all)]
    return np.bincount(real, minlength=SPECIALS.vocab_size)


def _encode(docs):
    sv = vocab.embedded_vocabulary()
    return [tuple(sv.encode(d)) for d in docs]


def _equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


@pytest.mark.parametrize("objective", ["mlm", "lm"])
def test_batches_match_make_iterator_layout_and_its_unshuffled_epoch(corpus, objective):
    """One host, one unshuffled epoch: the same batches (masks included) as make_iterator."""
    task = corpus["text"].replace("text_mlm", f"text_{objective}")
    kw = dict(split="validation", batch_size=8, seq_len=L, seed=4, num_epochs=1)
    ours = list(streaming.make_stream_iterator(task, **kw))
    theirs = list(pipeline.make_iterator(task, **kw))
    assert len(ours) == len(theirs) > 3
    assert _equal(ours, theirs)
    keys = {"input_ids", "labels", "loss_weights", "attention_mask"}
    assert set(ours[0]) == (keys | {"token_type_ids"} if objective == "mlm" else keys)
    for k, v in ours[0].items():
        assert v.dtype == (np.float32 if k == "loss_weights" else np.int32)
    assert not ours[-1]["attention_mask"][-1].any()  # completed by all-zero rows
    it = streaming.make_stream_iterator(task, **kw)
    assert it.num_steps is None and it.examples_per_epoch is None


def test_same_seed_same_stream_other_seed_other_stream_and_exact_resume(corpus):
    epoch = _take(corpus["text"], None, num_epochs=1)
    n = sum(int(b["attention_mask"].any(1).sum()) for b in epoch)  # rows per epoch
    steps = -(-2 * n // 8)  # two epochs of 8-row batches
    first = _take(corpus["text"], steps, seed=1)
    assert _equal(first, _take(corpus["text"], steps, seed=1))
    other = _take(corpus["text"], steps, seed=2)
    assert not any(np.array_equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(first, other))
    # Resume in epoch 2 (the stream is replayed across the epoch boundary).
    k = steps - 5
    assert k * 8 > n
    assert _equal(first[k:], _take(corpus["text"], 5, seed=1, start_step=k))
    # Every epoch holds the split's tokens once, in a new order.
    rows = _originals(first)
    counts = _token_counts(_originals(epoch))
    np.testing.assert_array_equal(_token_counts(rows[:n]), counts)
    np.testing.assert_array_equal(_token_counts(rows[n:2 * n]), counts)
    assert (rows[:n] != rows[n:2 * n]).any(1).mean() > 0.9
    # The same on host 1 of 2, whose masks are keyed by its own positions.
    host = _take(corpus["text"], 30, seed=1, shard_index=1, num_shards=2)
    resumed = _take(corpus["text"], 4, seed=1, shard_index=1, num_shards=2, start_step=26)
    assert _equal(host[26:], resumed)
    assert not any(np.array_equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(host, first))


def test_skipping_to_a_late_step_is_exact_and_its_rate(corpus):
    steps = 300  # ~5 epochs of 8-row batches
    t0 = time.perf_counter()
    first = _take(corpus["text"], 1, seed=3, start_step=0)
    t1 = time.perf_counter()
    late = _take(corpus["text"], 1, seed=3, start_step=steps)
    t2 = time.perf_counter()
    rate = steps * 8 / max((t2 - t1) - (t1 - t0), 1e-3)
    print(f"skip rate: {rate:,.0f} rows/s ({steps * 8} rows of {L} tokens)")
    reference = _take(corpus["text"], steps + 1, seed=3)
    assert _equal(reference[:1], first) and _equal(reference[steps:], late)


@pytest.fixture
def rows_read(monkeypatch):
    """The number of rows the streams made from here on have read from their tasks so far."""
    count = [0]
    numeric = streaming._numeric

    def bump():
        count[0] += 1
        return np.int32(0)

    def counted(ex):
        read = tf.py_function(bump, [], tf.int32)
        with tf.control_dependencies([read]):
            return {k: tf.identity(v) for k, v in numeric(ex).items()}

    monkeypatch.setattr(streaming, "_numeric", counted)
    return lambda: count[0]


def test_a_saved_position_resumes_exactly_without_reading_the_rows_before_it(corpus,
                                                                             rows_read):
    """O(1) resume: restoring the position saved after k batches reads about a shuffle buffer
    and the prefetched batches, whatever k, where a replay reads all k * 8 rows first."""
    k = 100  # 800 rows, 1.7 epochs: the position holds an epoch's file order and shuffle
    it = streaming.make_stream_iterator(corpus["text"], split="train", batch_size=8, seq_len=L,
                                        seed=5, shuffle_buffer=64)
    list(itertools.islice(it, k))
    assert it.step == k
    state = it.state()
    reference = [None] * k + list(itertools.islice(it, 4))  # the uninterrupted stream

    def resume(step, saved):
        before = rows_read()
        resumed = streaming.make_stream_iterator(corpus["text"], split="train", batch_size=8,
                                                 seq_len=L, seed=5, shuffle_buffer=64,
                                                 start_step=step)
        if saved is not None:
            resumed.restore(saved)
        return resumed, list(itertools.islice(resumed, 2)), rows_read() - before

    restored, batches, read = resume(k, state)
    assert _equal(batches, reference[k:k + 2])
    print(f"rows read to resume at step {k}: {read} restored, ", end="")
    assert read < 300, read  # shuffle buffer (64) + prefetch; 816 rows would be a replay
    replayed, batches, read = resume(k, None)  # the probe sees a replay
    print(f"{read} replayed")
    assert _equal(batches, reference[k:k + 2]) and read >= (k + 2) * 8
    # A position saved by a run that was itself resumed by replay (its dataset skips rows)
    # restores without replaying them either.
    again, batches, read = resume(k + 2, replayed.state())
    assert _equal(batches, reference[k + 2:k + 4]) and read < 300, read


def test_a_position_of_another_stream_or_step_is_refused(corpus):
    kw = dict(split="train", batch_size=8, seq_len=L, shuffle_buffer=64)
    it = streaming.make_stream_iterator(corpus["text"], seed=1, **kw)
    next(it)
    state = it.state()
    with pytest.raises(ValueError, match="saved at step 1, not 2"):
        streaming.make_stream_iterator(corpus["text"], seed=1, start_step=2, **kw).restore(state)
    with pytest.raises(ValueError, match=r"another stream \(seed differ\)"):
        streaming.make_stream_iterator(corpus["text"], seed=2, start_step=1, **kw).restore(state)
    with pytest.raises(ValueError, match=r"another stream \(batch_size, num_shards, shard_index differ"):
        streaming.make_stream_iterator(corpus["text"], seed=1, start_step=1, shard_index=1,
                                       num_shards=2, **kw).restore(state)
    with pytest.raises(ValueError, match="tf.data cannot restore it"):
        streaming.make_stream_iterator(corpus["text"], seed=1, start_step=1, **kw).restore(
            state[:-100])
    with pytest.raises(ValueError, match="must come before the first batch"):
        it.restore(state)


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_two_hosts_read_disjoint_documents_that_cover_the_epoch(corpus, fmt):
    docs = _encode(sum(corpus["train"], []))
    kw = dict(num_shards=2, num_epochs=1, batch_size=8)
    hosts = [_take(corpus[fmt], None, shard_index=i, **kw) for i in range(2)]
    got = []
    for i, batches in enumerate(hosts):
        host_docs, rest = _documents_of(_originals(batches))
        assert len(rest) == 0
        # 8 files >= 2 hosts: host i reads files i, i + 2, ... (in order, without shuffle).
        assert host_docs == _encode(sum(corpus["train"][i::2], []))
        got += host_docs
    assert len(got) == len(set(got)) == len(docs) and sorted(got) == sorted(docs)
    # Shuffled (files and rows), each host still reads exactly its documents' tokens once.
    shuffled = [_take(corpus[fmt], None, shard_index=i, shuffle=True, seed=5, **kw)
                for i in range(2)]
    for plain, mixed in zip(hosts, shuffled):
        np.testing.assert_array_equal(_token_counts(_originals(plain)),
                                      _token_counts(_originals(mixed)))
        assert not np.array_equal(_originals(plain), _originals(mixed))


def test_fewer_files_than_hosts_shard_by_documents(corpus):
    """One validation file, three hosts: every third document each."""
    docs = _encode(corpus["validation"])
    got = []
    for i in range(3):
        rows = _originals(_take(corpus["text"], None, split="validation", shard_index=i,
                                num_shards=3, num_epochs=1, batch_size=3))
        host_docs, _ = _documents_of(rows)
        assert host_docs == docs[i::3]
        got += host_docs
    assert sorted(got) == sorted(docs)


def test_mlm_statistics(corpus):
    batches = _take(corpus["text"], 50, batch_size=16, seed=11)
    ids = np.concatenate([b["input_ids"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    selected = np.concatenate([b["loss_weights"] for b in batches]) > 0
    orig = np.where(selected, labels, ids)
    selectable = ~np.isin(orig, SPECIALS.all)
    assert selectable.sum() > 20_000
    rate = selected.sum() / selectable.sum()
    assert abs(rate - 0.15) < 0.01, rate
    assert not (selected & ~selectable).any()  # never a special token or padding
    np.testing.assert_array_equal(labels != 0, selected)  # labels only where selected
    chosen = ids[selected]
    assert abs((chosen == SPECIALS.mask_id).mean() - 0.8) < 0.03
    # Masks differ between hosts: host 0's first rows are not masked like the 1-host stream.
    host0 = _take(corpus["text"], 4, batch_size=32, seed=11, shard_index=0, num_shards=2)
    single = _take(corpus["text"], 4, batch_size=16, seed=11)
    assert not _equal(host0, single)


def test_split_too_large_for_memory_is_refused_and_streams(corpus, monkeypatch):
    monkeypatch.setattr(pipeline, "_MAX_TOKENS_IN_MEMORY", 2_000)
    pipeline._rows.cache_clear()
    with pytest.raises(ValueError, match=r"set config\.data\.streaming=True"):
        pipeline.make_iterator(corpus["text"], split="train", batch_size=8, seq_len=L + 1,
                               seed=0)
    batches = _take(corpus["text"], None, seq_len=L + 1, num_epochs=1)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens > 5 * 2_000
    pipeline._rows.cache_clear()


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """70% rows of 'alpha' documents, 30% packed rows of 'beta' documents."""
    root = tmp_path_factory.mktemp("mix")
    for f in range(2):
        (root / f"a{f}.txt").write_text("\n".join(f"alpha {i} " * 20 for i in range(200)))
        (root / f"b{f}.txt").write_text("\n".join(f"beta {i % 40} " * 3 for i in range(400)))
    return mixtures.register_mixture(
        "test_streaming_mixture",
        [(f"text_mlm:{root}/a*.txt", 0.7), (f"text_mlm:{root}/b*.txt,pack=1", 0.3)])


def test_mixture_rates_packing_and_resume(mixture):
    batches = _take(mixture.name, 50, batch_size=100, seed=3, shuffle_buffer=128)
    vocabulary = mixture.tasks[0].output_features["input_ids"].vocabulary
    alpha, beta = vocabulary.encode("alpha")[-1], vocabulary.encode("beta")[-1]
    rows = _originals(batches)
    seg = np.concatenate([b["segment_ids"] for b in batches])
    is_a, is_b = (rows == alpha).any(1), (rows == beta).any(1)
    assert len(rows) == 5_000 and not (is_a & is_b).any() and (is_a | is_b).all()
    assert abs(is_b.mean() - 0.3) < 0.02, is_b.mean()
    assert (seg[is_b].max(1) > 1).mean() > 0.9 and (seg[is_a].max(1) == 1).all()
    np.testing.assert_array_equal(
        np.concatenate([b["positions"] for b in batches])[is_a],
        np.where(seg[is_a] > 0, np.arange(L), 0))
    assert _equal(batches[8:10], _take(mixture.name, 2, batch_size=100, seed=3,
                                       shuffle_buffer=128, start_step=8))
    # A saved position restores the mixture's sampler, both tasks' streams and the packer.
    kw = dict(split="train", batch_size=100, seq_len=L, seed=3, shuffle_buffer=128)
    it = streaming.make_stream_iterator(mixture.name, **kw)
    list(itertools.islice(it, 8))
    resumed = streaming.make_stream_iterator(mixture.name, start_step=8, **kw)
    resumed.restore(it.state())
    assert _equal(batches[8:10], list(itertools.islice(resumed, 2)))


def test_tfds_task_under_mock_data_streams_resumes_and_matches(tmp_path):
    spec = f"tfds_mlm:name=c4/en,data_dir={tmp_path}"
    with tfds.testing.mock_data(num_examples=40):
        kw = dict(split="validation", batch_size=4, seq_len=L, seed=2, num_epochs=1)
        ours = list(streaming.make_stream_iterator(spec, **kw))
        assert _equal(ours, list(pipeline.make_iterator(spec, **kw)))
        stream = _take(spec, 12, batch_size=4, seed=2)
        assert _equal(stream[9:], _take(spec, 3, batch_size=4, seed=2, start_step=9))
    assert len(ours) >= 3 and all(int(b["loss_weights"].sum()) > 0 for b in stream)


class StreamingTinyText(tfds.core.GeneratorBasedBuilder):
    """A real (file-backed) tfds dataset of 90 numbered documents, built locally."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # defined in a test module, not a tfds package

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(90)}

    def _generate_examples(self, count):
        rng = random.Random(1)
        for i in range(count):
            yield i, {"text": f"record {i} " + " ".join(rng.choice(WORDS) for _ in range(9))}


def test_tfds_hosts_read_disjoint_ranges_of_a_real_builder(tmp_path):
    builder = StreamingTinyText(data_dir=str(tmp_path))
    builder.download_and_prepare()
    texts = [x["text"].decode() for x in builder.as_dataset(split="train", shuffle_files=False)
             .as_numpy_iterator()]
    spec = f"tfds_mlm:name=streaming_tiny_text,data_dir={tmp_path},train=train"
    got = []
    for i in range(3):
        rows = _originals(_take(spec, None, shard_index=i, num_shards=3, num_epochs=1,
                                batch_size=3))
        host_docs, _ = _documents_of(rows)
        assert host_docs == _encode(texts[30 * i: 30 * (i + 1)])  # tfds.even_splits
        got += host_docs
    assert sorted(got) == sorted(_encode(texts))
    shuffled = _take(spec, 20, seed=9, shard_index=1, num_shards=3, batch_size=3)
    assert _equal(shuffled, _take(spec, 20, seed=9, shard_index=1, num_shards=3, batch_size=3))


def test_inspect_honours_streaming(corpus, capsys):
    from configs import quickstart

    config = quickstart.get_config("smoke")
    config.data.task = corpus["text"]
    config.data.streaming = True
    config.data.seq_len = L
    stats = inspect_cli.inspect(config, num_examples=1, num_batches=20)
    assert "streamed" in capsys.readouterr().out
    assert stats["rows"] == 160 and abs(stats["mask_rate"] - 0.15) < 0.03


@pytest.mark.slow  # four smoke runs on the streaming path (~80 s on 2 busy cores)
def test_train_loop_streams_evaluates_and_resumes_exactly(corpus, tmp_path, monkeypatch,
                                                          capsys):
    """Train 2 steps, resume to 4: the resumed run restores the saved input position (no
    replay) and trains on exactly the batches, to exactly the parameters, of a run straight
    to 4. Without a saved position (an older checkpoint) it replays, as exactly, and says so."""
    from bigs_jax.data import registry
    from bigs_jax.train import checkpointing, loop
    from tests.runs import params_of, smoke

    consumed = []
    checked = registry.checked_batches

    def recorded(*args, **kw):
        for batch in checked(*args, **kw):
            consumed.append(batch)
            yield batch

    monkeypatch.setattr(registry, "checked_batches", recorded)

    def run(steps, workdir):
        c = smoke(steps)
        c.data.task = corpus["text"]
        c.data.streaming = True
        c.data.shuffle_buffer = 256
        c.data.seq_len = L
        consumed.clear()
        summary = loop.train_and_evaluate(c, str(tmp_path / workdir))
        return summary, list(consumed), capsys.readouterr().out

    straight, batches, _ = run(4, "straight")
    first, _, _ = run(2, "run")
    assert first["steps"] == 2 and set(first["eval_loss"]) == {0, 2}
    assert first["eval_loss"][2] < first["eval_loss"][0]
    assert (tmp_path / "run" / checkpointing.CHECKPOINTS / "2" / checkpointing.DATA
            / "process_0-of-1").stat().st_size > 0
    resumed, resumed_batches, out = run(4, "run")  # continues from step 2
    assert "resuming from step 2" in out and "replaying" not in out
    assert resumed["steps"] == 4 and resumed["checkpoints"] == [2, 4]
    assert set(resumed["eval_loss"]) == {4} and resumed["eval_loss"][4] < first["eval_loss"][2]
    # The resume pulls one batch ahead to compile, then consumes it first: 2 batches in all.
    assert len(batches) == 4 and _equal(resumed_batches, batches[2:])
    for a, b in zip(params_of(str(tmp_path / "run")), params_of(str(tmp_path / "straight"))):
        np.testing.assert_array_equal(a, b)
    # Step 2 without its saved position: the resume replays the stream, to the same batches.
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / checkpointing.CHECKPOINTS / "4")
    shutil.rmtree(tmp_path / "again" / checkpointing.CHECKPOINTS / "2" / checkpointing.DATA)
    replayed, replayed_batches, out = run(4, "again")
    assert ("data: checkpoint step 2 has no input position to restore (it holds none for this "
            "process: saved by an older bigs_jax") in out
    assert replayed["steps"] == 4 and _equal(replayed_batches, batches[2:])


def test_streaming_arguments_are_checked(corpus):
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1"):
        streaming.make_stream_iterator(corpus["text"], split="train", batch_size=8, seq_len=L,
                                       seed=0, shuffle_buffer=0)
    with pytest.raises(ValueError, match="has no split 'test'"):
        streaming.make_stream_iterator(corpus["text"], split="test", batch_size=8, seq_len=L,
                                       seed=0)
    with pytest.raises(ValueError, match="not divisible by num_shards"):
        streaming.make_stream_iterator(corpus["text"], split="train", batch_size=9, seq_len=L,
                                       seed=0, num_shards=2)
    assert tf.executing_eagerly()


@pytest.mark.parametrize("flag,value", [("--batches", "0"), ("--examples", "-1")])
def test_inspect_refuses_counts_it_cannot_show(capsys, flag, value):
    """Found by tests/probe_bad_inputs.py: --batches 0 was a traceback from np.concatenate."""
    with pytest.raises(SystemExit) as e:
        inspect_cli.main(["inspect", "--config=configs/quickstart.py:smoke", flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --batches must be >= 1 and --examples >= 0, got "
        + ("0 and 3" if flag == "--batches" else "4 and -1"))
