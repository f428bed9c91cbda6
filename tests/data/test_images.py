"""Image data through tfds: the sklearn digits builder, the deterministic, resumable, per-host
sharded stream, eval padding, a mocked real builder (mnist) and the missing-data error."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigs_jax.data import images


def source(data_dir, **kw):
    return images.ImageSource("sklearn_digits", data_dir=data_dir, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_builder_splits_and_content(digits_dir):
    from sklearn.datasets import load_digits

    builder = images.load_builder("sklearn_digits", digits_dir)
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    src = source(digits_dir)
    assert src.model_overrides() == {"num_labels": 10, "image_size": 8, "num_channels": 1}
    digits = load_digits()
    # Train and test hold every image exactly once: match them back to sklearn's arrays.
    scaled = np.round(digits.images * (255 / 16)).astype(np.uint8)
    lookup = {x.tobytes(): i for i, x in enumerate(scaled)}
    seen = []
    for split in ("train", "test"):
        ex = src.examples(split)
        imgs, labels = ex.take(np.arange(len(ex)))
        for x, y in zip(imgs, labels):
            i = lookup[x[..., 0].tobytes()]
            assert digits.target[i] == y
            seen.append(i)
    assert len(seen) == len(set(seen)) == 1797
    # The test split is the fixed one of the builder's docstring.
    test_ids = sorted(seen[1437:])
    assert test_ids == sorted(np.random.RandomState(0).permutation(1797)[:360].tolist())


def test_build_is_deterministic(digits_dir, tmp_path):
    a, b = source(digits_dir).examples("test"), source(str(tmp_path)).examples("test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_batches_normalized_and_typed(digits_dir):
    batch = next(source(digits_dir, batch_size=16).train_batches())
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["labels"].dtype == np.int32 and batch["example_weights"].dtype == np.float32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0  # (x/255 - .5) / .5


def test_stream_is_seeded_and_epochs_are_permutations(digits_dir):
    n, g = 1437, 100
    idx = [images.train_indices(n, g, seed=3) for _ in range(2)]
    first = np.concatenate(take(idx[0], 30))
    np.testing.assert_array_equal(first, np.concatenate(take(idx[1], 30)))
    assert sorted(first[:n]) == list(range(n))          # epoch 0 visits each example once
    assert sorted(first[n:2 * n]) == list(range(n))     # and so does epoch 1 (across batches)
    assert not np.array_equal(first[:n], first[n:2 * n])
    other = np.concatenate(take(images.train_indices(n, g, seed=4), 30))
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("k", [1, 7, 14, 31])
def test_resume_equals_skipping(digits_dir, k):
    """Starting at batch k (epoch boundaries at 1437/100 ≈ 14.4 batches) = skipping k batches."""
    src = source(digits_dir, batch_size=100, seed=5)
    skipped = take(src.train_batches(0), k + 3)[k:]
    for a, b in zip(skipped, take(src.train_batches(k), 3)):
        assert_batches_equal(a, b)


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_and_add_up(digits_dir, hosts):
    single = take(source(digits_dir, batch_size=96).train_batches(10), 6)
    parts = [take(source(digits_dir, batch_size=96, shard_index=h,
                         num_shards=hosts).train_batches(10), 6) for h in range(hosts)]
    for step, whole in enumerate(single):
        merged = {k: np.concatenate([p[step][k] for p in parts]) for k in whole}
        assert_batches_equal(merged, whole)
    index = [np.concatenate(take(images.train_indices(1437, 96, seed=0, shard_index=h,
                                                      num_shards=hosts), 1)) for h in range(hosts)]
    assert len(set(np.concatenate(index).tolist())) == 96  # disjoint within a global batch


def test_eval_batches_cover_the_split_once_with_padding(digits_dir):
    src = source(digits_dir, eval_batch_size=100)
    batches = src.eval_batches_list()
    assert len(batches) == 4
    w = np.concatenate([b["example_weights"] for b in batches])
    assert w.sum() == 360 and np.all(w[:360] == 1) and np.all(w[360:] == 0)
    labels = np.concatenate([b["labels"] for b in batches])[:360]
    np.testing.assert_array_equal(labels, src.examples("test").labels)
    halves = [source(digits_dir, eval_batch_size=100, shard_index=h,
                     num_shards=2).eval_batches_list() for h in range(2)]
    for k, whole in enumerate(batches):
        assert_batches_equal({key: np.concatenate([h[k][key] for h in halves])
                              for key in whole}, whole)
    assert len(source(digits_dir, eval_batch_size=100, eval_batches=2).eval_batches_list()) == 2


def test_array_record_random_access_equals_in_memory(digits_dir, tmp_path):
    """A dataset prepared as ArrayRecord is read lazily by index and gives the same batches."""
    images.SklearnDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    lazy = source(str(tmp_path), batch_size=32, seed=1)
    assert lazy.examples("train").source is not None
    eager = source(digits_dir, batch_size=32, seed=1)
    for a, b in zip(take(lazy.train_batches(20), 2), take(eager.train_batches(20), 2)):
        assert_batches_equal(a, b)


def test_real_builder_through_the_same_path_with_mock_data(tmp_path):
    """tfds' own mnist builder (mocked examples) runs through the same code, resized too."""
    with tfds.testing.mock_data(num_examples=40):
        src = images.ImageSource("mnist", data_dir=str(tmp_path), batch_size=8,
                                 eval_batch_size=16)
        assert src.model_overrides() == {"num_labels": 10, "image_size": 28, "num_channels": 1}
        train, evals = src.iterators(0)
        batch = next(train)
        assert batch["image"].shape == (8, 28, 28, 1)
        assert batch["labels"].min() >= 0 and batch["labels"].max() < 10
        assert sum(b["example_weights"].sum() for b in evals) == 40
        small = images.ImageSource("mnist", data_dir=str(tmp_path), batch_size=8, image_size=16)
        assert next(small.train_batches())["image"].shape == (8, 16, 16, 1)
        assert small.model_overrides()["image_size"] == 16


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        images.ImageSource("mnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert f"tfds build mnist --data_dir={tmp_path}" in msg
    with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_set'"):
        images.ImageSource("no_such_set", data_dir=str(tmp_path))
