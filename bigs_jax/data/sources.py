"""SeqIO sources of `{"text": document}` examples: tfds builders, local files, the embedded corpus.

Every source reads what is already on disk (local or GCS); nothing downloads at run time.

- `tfds_source("c4/en", data_dir=DIR)`: a prepared tensorflow-datasets builder, read through
  `tfds.builder(name, data_dir).as_dataset`. A builder whose data is missing fails with one line
  naming `DIR` and the `tfds build` command that prepares it. `KNOWN_TFDS` lists the pretraining
  corpora tfds has and the feature that holds their text; tfds has no BookCorpus, Books3 or
  Pile builder, so `pg19` (Project Gutenberg books before 1919) stands in for books.
- `file_source("text", {"train": GLOB, ...})`: plain text (one document per non-blank line, as
  wikitext's paragraphs), JSONL (one JSON object per line, text under `text_key`) or TFRecord
  files of `tf.train.Example`s (bytes feature `text_key`). Files are read in sorted order, so
  row boundaries, and every pipeline built on them, are deterministic.
- The embedded corpus: `tasks.embedded_source()`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import seqio
import tensorflow as tf

from bigs_jax.data import hide_accelerators_from_tensorflow

hide_accelerators_from_tensorflow()

FORMATS = ("text", "jsonl", "tfrecord")

# Pretraining corpora in tfds: name -> (text feature, {our split: tfds split}). Wikipedia has
# one split; 0.5% of its articles are held out for validation.
KNOWN_TFDS = {
    "c4/en": ("text", {"train": "train", "validation": "validation"}),
    "c4/en.noclean": ("text", {"train": "train", "validation": "validation"}),
    "c4/realnewslike": ("text", {"train": "train", "validation": "validation"}),
    "wikipedia/20230601.en": ("text", {"train": "train[:99.5%]", "validation": "train[99.5%:]"}),
    "wikipedia/20201201.en": ("text", {"train": "train[:99.5%]", "validation": "train[99.5%:]"}),
    "wiki40b/en": ("text", {"train": "train", "validation": "validation", "test": "test"}),
    "pg19": ("book_text", {"train": "train", "validation": "validation", "test": "test"}),
    "lm1b": ("text", {"train": "train", "validation": "test"}),
}


class ShardedSource(seqio.DataSource):
    """A SeqIO source over `dataset_fn(split, shuffle_files, seed=None, shard_info=None)`.

    Unlike `seqio.FunctionDataSource`, it passes `shard_info` on, so each host reads only its
    part of a split (see the module docstring).

    Args:
        dataset_fn: returns the (part of the) split as a dataset of `{"text": tf.string}`.
        splits: split names.
        list_shards: split -> the units it can be sharded by (file names); None for a source
            that shards any number of ways (tfds ranges of examples).
    """

    def __init__(self, dataset_fn, splits, *, list_shards=None):
        super().__init__(splits=splits)
        self._dataset_fn = dataset_fn
        self._list_shards = list_shards

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self._list_shards is None

    def list_shards(self, split: str) -> list[str]:
        return list(self._list_shards(split)) if self._list_shards else [split]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | tf.Tensor | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # SeqIO's signature; unused by sources
        if shard_info is not None and shard_info.num_shards == 1:
            shard_info = None
        return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed,
                                shard_info=shard_info)


def _seed_pair(seed: int | tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])


def _base_name(name: str) -> str:
    return name.split(":")[0]  # "c4/en:3.1.0" -> "c4/en"


def tfds_source(
    name: str,
    *,
    data_dir: str | None,
    text_key: str | None = None,
    splits: Mapping[str, str] | None = None,
) -> ShardedSource:
    """A prepared tfds builder as a SeqIO source of `{"text": ...}` examples.

    Args:
        name: builder name with config and optional version, e.g. "c4/en", "pg19",
            "wikipedia/20230601.en", "c4/en:3.1.0".
        data_dir: the tfds data directory holding the prepared dataset (local or gs://);
            None uses tfds's default (~/tensorflow_datasets).
        text_key: feature holding the document text; defaults from `KNOWN_TFDS`, else "text".
        splits: {our split name: tfds split spec}; defaults from `KNOWN_TFDS`, else
            train/validation.

    Returns:
        A source whose datasets yield `{"text": tf.string}` in the builder's file order
        (shuffled by the seed when one is given with `shuffle_files`).
    """
    known_key, known_splits = KNOWN_TFDS.get(_base_name(name), ("text", None))
    text_key = text_key or known_key
    splits = dict(splits or known_splits or {"train": "train", "validation": "validation"})

    def dataset_fn(split: str, shuffle_files: bool, seed=None, shard_info=None) -> tf.data.Dataset:
        # tfds takes seconds to import; only tfds sources need it.
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        part = splits[split]
        if shard_info is not None:
            part = tfds.even_splits(part, shard_info.num_shards)[shard_info.index]
        # Without a seed the file order stays fixed: rows, and the pipelines built on them,
        # depend on it.
        shuffle = shuffle_files and seed is not None
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            ds = builder.as_dataset(
                split=part, shuffle_files=shuffle,
                read_config=tfds.ReadConfig(shuffle_seed=seed) if shuffle else None)
        except tfds.core.DatasetNotFoundError:
            raise FileNotFoundError(
                f"tfds has no dataset {name!r}; pretraining corpora it has: "
                f"{', '.join(sorted(KNOWN_TFDS))}."
            ) from None
        except AssertionError as e:  # tfds's "could not find data in DIR"
            where = data_dir or "~/tensorflow_datasets"
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in {where}; prepare it once with "
                f"`tfds build {_base_name(name)} --data_dir={where}` (or copy a prepared "
                "copy there), nothing is downloaded at run time."
            ) from e
        if text_key not in builder.info.features:
            raise ValueError(
                f"tfds dataset {name!r} has no feature {text_key!r}; its features are "
                f"{sorted(builder.info.features)}; pass text_key=."
            )
        return ds.map(lambda ex: {"text": ex[text_key]}, num_parallel_calls=tf.data.AUTOTUNE)

    return ShardedSource(dataset_fn, tuple(splits))


def _files(pattern: str) -> list[str]:
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No file matches {pattern!r}; pass an existing file or glob.")
    return files


def _jsonl_texts(paths, text_key: str):
    """The `text_key` of every JSON line of `paths` (bytes file names), in order."""
    # A module-level generator: nested in a dataset_fn, it would keep AutoGraph from
    # converting that function when a streaming epoch traces it.
    for path in paths:
        path = path.decode("utf-8")
        with tf.io.gfile.GFile(path, "r") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_key]
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"{path}:{number} is not a JSON object with a string "
                            f"{text_key!r} ({e}); fix the line or pass text_key=."
                        ) from None


def file_source(
    fmt: str,
    split_to_pattern: Mapping[str, str],
    *,
    text_key: str = "text",
) -> ShardedSource:
    """Local or GCS files as a SeqIO source of `{"text": ...}` examples.

    Args:
        fmt: "text" (a document per non-blank line), "jsonl" (a JSON object per line, the
            document under `text_key`) or "tfrecord" (`tf.train.Example`s with a bytes
            feature `text_key`).
        split_to_pattern: {split: glob}, e.g. {"train": "data/train-*.txt"}; files of a split
            are read one after another in sorted order (in a seeded order when a seed comes
            with `shuffle_files`). Every glob must match (checked here).
        text_key: the JSON key or tf.Example feature of the text.

    Returns:
        A source whose datasets yield `{"text": tf.string}`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown file format {fmt!r}; use one of {FORMATS}.")
    files = {split: _files(pattern) for split, pattern in split_to_pattern.items()}

    def dataset_fn(split: str, shuffle_files: bool, seed=None, shard_info=None) -> tf.data.Dataset:
        paths = files[split]
        if shard_info is not None:
            paths = paths[shard_info.index::shard_info.num_shards]
        paths = tf.constant(paths, tf.string)
        if shuffle_files and seed is not None:
            order = tf.argsort(tf.random.stateless_uniform(tf.shape(paths), _seed_pair(seed)))
            paths = tf.gather(paths, order)
        if fmt == "text":
            ds = tf.data.TextLineDataset(paths)
            ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
            return ds.map(lambda line: {"text": tf.strings.strip(line)})
        if fmt == "tfrecord":
            spec = {text_key: tf.io.FixedLenFeature([], tf.string)}
            return tf.data.TFRecordDataset(paths).map(
                lambda r: {"text": tf.io.parse_single_example(r, spec)[text_key]}
            )
        ds = tf.data.Dataset.from_generator(functools.partial(_jsonl_texts, text_key=text_key),
                                            args=(paths,),
                                            output_signature=tf.TensorSpec([], tf.string))
        return ds.map(lambda text: {"text": text})

    return ShardedSource(dataset_fn, tuple(split_to_pattern), list_shards=files.__getitem__)
