"""Image-classification data read through tensorflow-datasets from a local `data_dir`.

    config.data.source = "images"
    config.data.tfds_name = "sklearn_digits"    # or mnist, cifar10, imagenet2012, ... prepared
    config.data.data_dir = ""                   # "" = tfds' default (~/tensorflow_datasets)

Any tfds image-classification dataset with `image` and `label` features works once prepared
in `data_dir` (`tfds build NAME --data_dir=DIR`); nothing is downloaded at training time. The
smoke configs use `sklearn_digits`: scikit-learn's bundled 8x8 digits (1797 images, 10
classes) as a tfds builder, built into `data_dir` on first use with no network.

Batches are host-local numpy dicts: `image` uint8 (B, H, W, C), `labels` int32 (B,),
`example_weights` float32 (B,) (0 on the padding rows of the last eval batch). The pixels
travel as uint8; `ImageSource.device_batch`, run inside the jitted steps, makes them float32
(pixels/255 - mean) / std. The training stream is a pure function of (seed, batch index):
epoch e visits the split in the order `permutation(seed, e)`, the stream runs on across
epochs, global batch k is positions [k·G, (k+1)·G) of it, and host h of n takes rows
[h·G/n, (h+1)·G/n) of each global batch. So resuming at batch k needs no replay, and the
hosts' parts are disjoint and add up to the single-host stream.

Examples are read by index, images still encoded: datasets prepared as ArrayRecord (`tfds
build --file_format=array_record`) are read lazily through `tfds.data_source` (ImageNet-sized
sets: host memory is then bounded by the prefetch depth, not the split size); TFRecord-prepared
ones are loaded into memory once, encoded (digits, MNIST, CIFAR). tf.data decodes and resizes
them in a parallel map, PREFETCH batches ahead of the consumer. The eval split is streamed
afresh at every evaluation, never held. No augmentation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bigs_jax.data import hide_accelerators_from_tensorflow, registry

DIGITS_TEST_SIZE = 360  # ~20% of the 1797 images; the rest (1437) is the train split


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set) as a tfds dataset.

    Pixels 0..16 are scaled to 0..255. A fixed permutation (numpy seed 0) puts 360 images in
    `test` and 1437 in `train`. The data ships inside scikit-learn: building needs no network.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, fixed 1437/360 train/test split."}
    # Nothing is downloaded, so no checksums file: tfds would otherwise look for one next to
    # this module (which needs the optional importlib_resources package).
    url_infos = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="8x8 grayscale handwritten digits bundled with scikit-learn.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/"
                     "sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train"),
                "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        # scikit-learn loads in ~1 s; only this builder needs it
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        keep = order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:]
        for i in sorted(keep):
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            yield int(i), {"image": pixels[..., None], "label": int(digits.target[i])}


# Datasets built from data already on this machine: prepared on first use.
LOCAL_BUILDERS = {"sklearn_digits"}


def load_builder(name: str, data_dir: str = "") -> tfds.core.DatasetBuilder:
    """The tfds builder of `name` in `data_dir` ("" = tfds' default); local builders
    (`LOCAL_BUILDERS`) are prepared on first use.

    Raises:
      ValueError: unknown dataset name.
    """
    hide_accelerators_from_tensorflow()
    try:
        builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} in config.data.tfds_name; use a "
                         "registered tfds name (e.g. mnist, cifar10, imagenet2012) or "
                         "sklearn_digits") from None
    if name in LOCAL_BUILDERS and not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def not_prepared(name: str, data_dir: str) -> FileNotFoundError:
    """The one-line error for a dataset missing from data_dir, with the command that builds it."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in data_dir {where}; build it once with "
        f"`tfds build {name} --data_dir={where}` (add --file_format=array_record for large "
        "datasets), or set config.data.data_dir to where it is; nothing is downloaded at run "
        "time")


PREFETCH = 2  # host batches decoded ahead of the consumer: what bounds the pipeline's memory


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def decode_fn(features: tfds.features.FeaturesDict, size: int):
    """The tf.data map of one encoded image (JPEG/PNG bytes) → uint8 (size, size, C): decoded
    (JPEG with the accurate DCT, others by tfds' `image` feature), then, unless already that
    size, a bilinear resize with antialiasing rounded half to even back to uint8."""
    image = features["image"]

    def resize(x):
        out = tf.image.resize(x, (size, size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        # JPEGs with the accurate integer DCT, as libjpeg's and PIL's default (and tfds' numpy
        # reader, which read ArrayRecord sets before); TensorFlow's default is the fast one.
        x = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: tf.io.decode_jpeg(encoded, channels=image.shape[-1],
                                              dct_method="INTEGER_ACCURATE"),
                    lambda: image.decode_example(encoded))
        same = tf.logical_and(tf.shape(x)[0] == size, tf.shape(x)[1] == size)
        x = tf.cond(same, lambda: x, lambda: resize(x))
        return tf.ensure_shape(x, (size, size, image.shape[-1]))

    return decode


class Examples:
    """Random access to one split's examples by index, images still encoded (JPEG/PNG bytes).

    ArrayRecord splits are read lazily from disk; TFRecord ones (small sets) are loaded into
    memory once, encoded. `batches` decodes them in tf.data's parallel map.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, image_size: int):
        self.image_size = image_size
        self.decode = decode_fn(builder.info.features, image_size)
        self.source = None
        skip = {"image": tfds.decode.SkipDecoding()}
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            self.source = builder.as_data_source(split=split, decoders=skip)
            self.size = len(self.source)
            return
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=skip)
        encoded, labels = [], []
        for x, y in tfds.as_numpy(ds.map(lambda ex: (ex["image"], ex["label"])).batch(1024)):
            encoded.append(x)
            labels.append(y)
        self.encoded = np.concatenate(encoded) if encoded else np.zeros((0,), object)
        self.labels = (np.concatenate(labels).astype(np.int32) if labels
                       else np.zeros((0,), np.int32))
        self.size = len(self.labels)

    def __len__(self) -> int:
        return self.size

    def take_encoded(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encoded images (n,) (bytes) and int32 labels (n,) of examples `index`."""
        if self.source is None:
            return self.encoded[index], self.labels[index]
        examples = self.source.__getitems__([int(i) for i in index])
        return (np.asarray([ex["image"] for ex in examples], object),
                np.asarray([ex["label"] for ex in examples], np.int32))

    def batches(self, rows: Iterable[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[dict]:
        """The host batches of `rows`, (example indices, example weights) of `size` rows per
        batch: `image` uint8 (size, S, S, C), `labels` int32, `example_weights` float32;
        decoded and resized in parallel by tf.data, PREFETCH batches ahead."""

        def encoded():
            for index, weights in rows:
                images, labels = self.take_encoded(index)
                yield images, labels, weights.astype(np.float32)

        spec = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.float32))
        ds = tf.data.Dataset.from_generator(encoded, output_signature=spec).unbatch()
        # One decode per usable core at once (order is kept). AUTOTUNE often ran them one at
        # a time on the idle 2-core VM: ~384 images/s, 0.95 cores busy, against 635-700 here.
        ds = ds.map(lambda x, y, w: {"image": self.decode(x), "labels": y,
                                     "example_weights": w},
                    num_parallel_calls=usable_cores())
        options = tf.data.Options()
        # Its own threads (0: one per core): the map's parallelism must not depend on the
        # process's TensorFlow inter-op pool, which may be kept small (bench/data.py pins it).
        options.threading.private_threadpool_size = 0
        return iter(tfds.as_numpy(ds.batch(size).prefetch(PREFETCH).with_options(options)))

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded uint8 images (n, S, S, C) and int32 labels (n,) of examples `index`."""
        batch = next(self.batches([(np.asarray(index), np.ones(len(index)))], len(index)))
        return batch["image"], batch["labels"]


def train_indices(n: int, global_batch: int, *, seed: int, start_step: int = 0,
                  shard_index: int = 0, num_shards: int = 1) -> Iterator[np.ndarray]:
    """Example indices of this host's part of global batches start_step, start_step + 1, ...

    See the module docstring; every epoch is a fresh permutation drawn from (seed, epoch).
    """
    if global_batch % num_shards:
        raise ValueError(f"config.data.batch_size {global_batch} is not divisible by the "
                         f"{num_shards} hosts; pick a multiple of {num_shards}")
    if n == 0:
        raise ValueError("the train split is empty")
    local = global_batch // num_shards
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        pos = step * global_batch + shard_index * local + np.arange(local)
        epoch, within = pos // n, pos % n
        for e in np.unique(epoch):
            if e not in perms:
                perms[int(e)] = np.random.default_rng([seed, int(e)]).permutation(n)
        for e in [e for e in perms if e < epoch.min()]:
            del perms[e]
        yield np.asarray([perms[int(e)][w] for e, w in zip(epoch, within)], np.int64)
        step += 1


@dataclasses.dataclass
class ImageSource:
    """`config.data.source = "images"`: a tfds image dataset (see the module docstring)."""

    name: str
    data_dir: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 0                      # 0: the dataset's own (fixed, square) size
    mean: float = 0.5
    std: float = 0.5
    batch_size: int = 32
    eval_batch_size: int = 32
    eval_batches: int = 0                    # 0: the whole eval split
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self):
        self.builder = load_builder(self.name, self.data_dir)
        features = self.builder.info.features
        if "image" not in features or "label" not in features:
            raise ValueError(f"tfds dataset {self.name!r} has features {list(features)}; an "
                             "image-classification dataset needs `image` and `label`")
        h, w, self.channels = features["image"].shape
        if not self.image_size:
            if h is None or h != w:
                raise ValueError(f"tfds dataset {self.name!r} has images of shape "
                                 f"{features['image'].shape}; set config.data.image_size to "
                                 "resize them to a square size")
            self.image_size = h
        self.num_labels = features["label"].num_classes
        self._splits: dict[str, Examples] = {}

        self.examples(self.train_split)  # fail now, before any model is built

    def examples(self, split: str) -> Examples:
        if split not in self._splits:
            try:
                self._splits[split] = Examples(self.builder, split, self.image_size)
            except AssertionError:  # tfds's "Dataset ... could not find data in DIR"
                raise not_prepared(self.name, self.data_dir) from None
            except ValueError as e:
                if "split" not in str(e).lower():
                    raise
                raise ValueError(f"tfds dataset {self.name!r} has no split {split!r}: "
                                 f"{' '.join(str(e).split())}") from None
        return self._splits[split]

    def model_overrides(self) -> dict:
        return {"num_labels": self.num_labels, "image_size": self.image_size,
                "num_channels": self.channels}

    def device_batch(self, batch: dict) -> dict:
        """`batch` with its uint8 `image` normalised, (pixels/255 - mean) / std in float32:
        run inside the jitted steps (the loop's `Program`), so hosts send uint8."""
        return {**batch, "image": normalize(batch["image"], self.mean, self.std)}

    def train_batches(self, start_step: int = 0) -> Iterator[dict]:
        examples = self.examples(self.train_split)
        index = train_indices(len(examples), self.batch_size, seed=self.seed,
                              start_step=start_step, shard_index=self.shard_index,
                              num_shards=self.num_shards)
        local = self.batch_size // self.num_shards
        return examples.batches(((i, np.ones(local)) for i in index), local)

    def eval_stream(self) -> "Batches":
        """The eval split in order, global batches of eval_batch_size (the last padded with
        weight-0 copies of the last example), this host's rows of each; decoded afresh on
        every pass, so memory does not grow with the split."""
        examples = self.examples(self.eval_split)
        g, n = self.eval_batch_size, len(examples)
        if g % self.num_shards:
            raise ValueError(f"config.data.eval_batch_size {g} is not divisible by the "
                             f"{self.num_shards} hosts; pick a multiple of {self.num_shards}")
        local = g // self.num_shards
        count = -(-n // g)
        if self.eval_batches:
            count = min(count, self.eval_batches)
        positions = [k * g + self.shard_index * local + np.arange(local) for k in range(count)]
        return Batches(lambda: examples.batches(
            ((np.minimum(pos, n - 1), (pos < n).astype(np.float32)) for pos in positions),
            local), count)

    def iterators(self, start_step: int) -> tuple[Iterator[dict], "Batches"]:
        return self.train_batches(start_step), self.eval_stream()


def normalize(image, mean: float, std: float):
    """uint8 pixels (numpy or jax) → float32 (pixels/255 - mean) / std."""
    return (image.astype(np.float32) / 255.0 - mean) / std


@dataclasses.dataclass
class Batches:
    """A finite stream of batches that can be iterated again (each eval reads it afresh)."""

    make: Callable[[], Iterator[dict]]
    count: int

    def __iter__(self) -> Iterator[dict]:
        return iter(self.make())

    def __len__(self) -> int:
        return self.count


def data_source(config) -> ImageSource:
    """The `ImageSource` of `config.data` on this host (jax.process_index of process_count)."""
    d = config.data  # configs/vit.py's image_config sets every key
    return ImageSource(
        name=d.tfds_name, data_dir=d.data_dir, train_split=d.train_split,
        eval_split=d.eval_split, image_size=d.image_size, mean=d.mean, std=d.std,
        batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
        eval_batches=d.eval_batches, seed=d.seed,
        shard_index=jax.process_index(), num_shards=jax.process_count())


registry.register("images", data_source)
