"""Host pipeline: determinism, exact resume, sharding, dynamic masks, finite padded eval."""

import collections
import itertools

import numpy as np
import pytest
import seqio

from bigs_jax.data import pipeline

L = 64


def _take(it, n):
    return list(itertools.islice(it, n))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _originals(batch):
    """Unmasked ids of an MLM batch: labels where a position was selected, inputs elsewhere."""
    return np.where(batch["loss_weights"] > 0, batch["labels"], batch["input_ids"])


def _rows(task_name, split):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset({k: L for k in task.output_features}, split=split, shuffle=False)
    return np.stack([ex["input_ids"] for ex in ds.as_numpy_iterator()])


def test_examples_per_epoch_matches_the_task():
    for task, split in [("embedded_mlm", "train"), ("embedded_lm", "validation")]:
        assert pipeline.examples_per_epoch(task, split=split, seq_len=L) == len(_rows(task, split))


def test_same_seed_same_batches_other_seed_other_batches():
    kw = dict(split="train", batch_size=16, seq_len=L, seed=3)
    first = _take(pipeline.make_iterator("embedded_mlm", **kw), 4)
    _assert_same(first, _take(pipeline.make_iterator("embedded_mlm", **kw), 4))
    other = _take(pipeline.make_iterator("embedded_mlm", **{**kw, "seed": 4}), 1)[0]
    assert (other["input_ids"] != first[0]["input_ids"]).any()
    assert first[0]["input_ids"].shape == (16, L) and first[0]["input_ids"].dtype == np.int32
    assert first[0]["loss_weights"].dtype == np.float32


@pytest.mark.parametrize("task", ["embedded_mlm", "embedded_lm"])
def test_resume_equals_the_uninterrupted_stream(task):
    # ~1,100 train rows at L=64: batch 128 crosses the first epoch boundary at step 8 or 9.
    kw = dict(split="train", batch_size=128, seq_len=L, seed=11)
    full = _take(pipeline.make_iterator(task, **kw), 14)
    resumed = pipeline.make_iterator(task, start_step=7, **kw)
    assert resumed.step == 7
    _assert_same(full[7:], _take(resumed, 7))
    assert resumed.step == 14


def test_shards_are_disjoint_and_concatenate_to_the_single_host_stream():
    kw = dict(split="train", batch_size=64, seq_len=L, seed=5)
    steps = len(_rows("embedded_mlm", "train")) // 64 + 1  # a whole epoch
    single = _take(pipeline.make_iterator("embedded_mlm", **kw), steps)
    shards = [
        _take(pipeline.make_iterator("embedded_mlm", shard_index=i, num_shards=4, **kw), steps)
        for i in range(4)
    ]
    for step, batch in enumerate(single):
        for k in batch:
            joined = np.concatenate([shards[i][step][k] for i in range(4)])
            np.testing.assert_array_equal(joined, batch[k], err_msg=f"{k} at step {step}")
    # Within an epoch every row is served at most once, by exactly one shard.
    rows = _rows("embedded_mlm", "train")
    per_shard = [np.concatenate([_originals(b) for b in s])[: len(rows) // 64 * 16] for s in shards]
    served = collections.Counter(r.tobytes() for part in per_shard for r in part)
    available = collections.Counter(r.tobytes() for r in rows)
    assert sum(served.values()) == len(rows) // 64 * 64
    assert all(count <= available[row] for row, count in served.items())


def test_each_epoch_is_a_new_permutation_of_the_rows():
    rows = _rows("embedded_lm", "validation")
    n = len(rows)
    it = pipeline.make_iterator("embedded_lm", split="validation", batch_size=n, seq_len=L, seed=0)
    epoch0, epoch1 = (b["input_ids"] for b in _take(it, 2))
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    assert key(epoch0) == key(epoch1) == key(rows)
    assert (epoch0 != epoch1).any() and (epoch0 != rows).any()


def test_masks_are_dynamic_across_epochs_and_fixed_per_step():
    rows = _rows("embedded_mlm", "validation")
    n = len(rows)
    kw = dict(split="validation", batch_size=n, seq_len=L, seed=2, shuffle=False)
    epoch0, epoch1 = _take(pipeline.make_iterator("embedded_mlm", **kw), 2)
    np.testing.assert_array_equal(_originals(epoch0), rows)
    np.testing.assert_array_equal(_originals(epoch1), rows)
    differ = (epoch0["loss_weights"] != epoch1["loss_weights"]).any(axis=1)
    assert differ.mean() > 0.95
    _assert_same([epoch1], _take(pipeline.make_iterator("embedded_mlm", start_step=1, **kw), 1))


@pytest.mark.parametrize("num_shards", [1, 2])
def test_eval_is_finite_and_pads_with_zero_weight_rows(num_shards):
    rows = _rows("embedded_lm", "validation")
    n = len(rows)  # not a multiple of 32
    per_shard = []
    for shard in range(num_shards):
        it = pipeline.make_iterator(
            "embedded_lm",
            split="validation",
            batch_size=32,
            seq_len=L,
            seed=0,
            num_epochs=1,
            shard_index=shard,
            num_shards=num_shards,
        )
        per_shard.append(list(it))
        assert it.num_steps == -(-n // 32) == len(per_shard[-1])
    steps = [
        {k: np.concatenate([s[i][k] for s in per_shard]) for k in per_shard[0][i]}
        for i in range(len(per_shard[0]))
    ]
    ids = np.concatenate([b["input_ids"] for b in steps])
    np.testing.assert_array_equal(ids[:n], rows)  # unshuffled, in order
    for k in ("input_ids", "labels", "loss_weights", "attention_mask"):
        padding = np.concatenate([b[k] for b in steps])[n:]
        assert len(padding) == len(steps) * 32 - n and not padding.any(), k


def test_eval_mlm_weights_cover_real_rows_only():
    it = pipeline.make_iterator(
        "embedded_mlm", split="validation", batch_size=40, seq_len=L, seed=0, num_epochs=2
    )
    batches = list(it)
    n = pipeline.examples_per_epoch("embedded_mlm", split="validation", seq_len=L)
    real = np.concatenate([b["attention_mask"].any(axis=1) for b in batches])
    assert real.sum() == 2 * n and real[: 2 * n].all()
    weights = np.concatenate([b["loss_weights"] for b in batches])
    assert not weights[2 * n :].any() and weights[: 2 * n].sum() > 0


def test_bad_arguments_fail_clearly():
    kw = dict(split="train", batch_size=8, seq_len=L, seed=0)
    with pytest.raises(ValueError, match="Unknown task 'nope'; registered tasks: .*embedded_mlm"):
        pipeline.make_iterator("nope", **kw)
    with pytest.raises(ValueError, match="has no split 'test'"):
        pipeline.make_iterator("embedded_mlm", **{**kw, "split": "test"})
    with pytest.raises(ValueError, match="not divisible by num_shards 3"):
        pipeline.make_iterator("embedded_mlm", num_shards=3, **kw)
    with pytest.raises(ValueError, match="mask_rate must be in"):
        pipeline.make_iterator("embedded_mlm", mask_rate=0.0, **kw)
