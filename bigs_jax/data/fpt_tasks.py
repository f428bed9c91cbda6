"""The FPT paper's tasks as a train-loop data source (`config.data.source = "fpt"`).

Lu et al. 2021 (arXiv 2103.05247), inputs built as the official code builds them
(research/fpt_growth.md §1.3); `config.data.task` picks one:

| task | tokens × features fed to the backbone | predictions |
|---|---|---|
| bit-memory | 5 patterns + a query (bits zeroed w.p. 0.5) of 1000 ±1 → 120 × 50 | 1000 bits |
| bit-xor | two 5-bit strings → 10 × 1 | 5 bits, last 5 positions |
| listops | LRA ListOps ids (generated, or LRA's basic_*.tsv) → seq_len ids | 10 classes |
| mnist | 28×28, 4×4 patches (p1 p2 c) → 49 × 16, pixels in [0, 1] | 10 classes |
| cifar10 | 32×32×3, 4×4 patches → 64 × 48, per-channel CIFAR mean/std | 10 classes |
| cifar10-gray | CIFAR-10 LRA: grayscale, 1 pixel per token → 1024 × 1, in [-1, 1] | 10 classes |
| digits | scikit-learn 8×8 digits (offline smoke set), 2×2 patches → 16 × 4 | 10 classes |
| remote-homology | TAPE fold classification, amino-acid ids → seq_len ids | 1195 folds |

Splits: `train`, `validation`, `test`. Bit tasks draw fresh examples from (seed, batch index),
so resuming is exact; their validation and test sets are fixed draws from other seeds. ListOps
generated sets come from `data.generator_seed` (the same data for every run); the LRA files
and TAPE have their own validation split; image validation sets are a fixed 10%
(`data.val_fraction`) carved from train. Remote homology reads TAPE's own
`remote_homology_*.lmdb` (its download unpacked) or JSON lists of the same records
(bigs_jax.data.tape; the LMDB records are unpickled: trusted files only).

Augmentation (`data.augment`, default on, as the official code): the cifar10 and cifar10-gray
training batches go through the official torchvision transforms in their order, on [0, 1]
pixels after the grayscale step and before normalization and patching: RandomCrop(32,
padding=4) (zero padding), RandomHorizontalFlip(), RandomRotation(20) (an angle uniform in
[-20°, 20°], nearest pixel about the centre, zero fill). Each batch's draws come from (seed,
batch index), like the bit tasks', so a resumed run sees the same batches; validation and test
are never augmented, nor are the other tasks (the official code augments only CIFAR).

Batches: `inputs` float32 (B, L, I) or int32 (B, L), `labels` int32 (B,) or (B, T),
`example_weights` float32 (B,). `score` reports validation and test accuracy (and, for bit
tasks, `exact`: every bit of an example right) at each evaluation, written to
`data.scores_dir/dev/step_N.json` for eval.py's protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np
from ml_collections import ConfigDict
from scipy import ndimage

from bigs_jax.data import images, listops, registry, tape
from bigs_jax.data.images import train_indices
from bigs_jax.errors import ConfigError
from bigs_jax.train.metrics import write_scores

TASKS = ("bit-memory", "bit-xor", "listops", "mnist", "cifar10", "cifar10-gray", "digits",
         "remote-homology")
# tfds name, patch size, grayscale, per-channel (mean, std) after scaling pixels to [0, 1].
# CIFAR-10's are the official code's Normalize constants (std 0.2023, 0.1994, 0.2010, the
# widely copied figures, not the dataset's own per-channel std of about 0.247, 0.243, 0.261).
IMAGE_TASKS = {
    "mnist": ("mnist", 4, False, ((0.0,), (1.0,))),
    "cifar10": ("cifar10", 4, False, ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))),
    "cifar10-gray": ("cifar10", 1, True, ((0.5,), (0.5,))),
    "digits": ("sklearn_digits", 2, False, ((0.0,), (1.0,))),
}
# The luma weights of torchvision's Grayscale on a float tensor (rgb_to_grayscale), which the
# official code applies after ToTensor: ITU-R 601 with 0.2989 for red.
LUMA = np.array([0.2989, 0.587, 0.114], np.float32)
# The official code's CIFAR training augmentation (see the module docstring).
AUGMENTED_TASKS = ("cifar10", "cifar10-gray")
CROP_PADDING, MAX_DEGREES = 4, 20.0
TAPE_VOCAB = tape.VOCAB
HOMOLOGY_CLASSES = 1195
HOMOLOGY_SPLITS = {"train": "train", "validation": "valid", "test": "test_fold_holdout"}


# Per task and size: config values (dotted paths) that configs/fpt.py and eval.py's protocol
# set. `paper`: the official task sizes, CPU-sized runs (batch, steps); `cpu`: smaller tasks
# for the CPU protocol run (ListOps up to 45 tokens and digits: 150 steps of batch 16, far
# from the paper's "to convergence"; bit memory over 100 bits, 12 tokens, for 4,000 steps:
# it sits at the ~75% that copying the query's visible bits gives for ~1,000 steps before it
# learns the lookup, so 150 steps would measure nothing).
TASK_SETTINGS = {
    "paper": {
        "bit-memory": {"data.n_bits": 1000, "data.patch_size": 50, "data.batch_size": 32,
                       "train.steps": 4000, "evals": 8},
        "bit-xor": {"data.n_bits": 5, "data.patch_size": 1, "data.batch_size": 32,
                    "train.steps": 1000, "evals": 4},
        "listops": {"data.seq_len": 512, "data.listops_min_length": 500,
                    "data.listops_max_length": 2000, "data.batch_size": 16,
                    "train.steps": 10000, "evals": 10},
        "mnist": {"data.batch_size": 32, "train.steps": 5000, "evals": 5},
        "cifar10": {"data.batch_size": 32, "train.steps": 10000, "evals": 10},
        "cifar10-gray": {"data.batch_size": 16, "train.steps": 10000, "evals": 10},
        "digits": {"data.batch_size": 32, "train.steps": 1500, "evals": 5},
        "remote-homology": {"data.seq_len": 1024, "data.batch_size": 16,
                            "train.steps": 10000, "evals": 10},
    },
    "cpu": {
        "bit-memory": {"data.n_bits": 100, "data.patch_size": 50, "data.batch_size": 16,
                       "data.eval_examples": 500, "train.steps": 4000, "evals": 8},
        "bit-xor": {"data.n_bits": 5, "data.patch_size": 1, "data.batch_size": 16,
                    "data.eval_examples": 500, "train.steps": 150, "evals": 2},
        "listops": {"data.seq_len": 48, "data.listops_min_length": 10,
                    "data.listops_max_length": 45, "data.listops_train": 5000,
                    "data.listops_eval": 500, "data.batch_size": 16, "train.steps": 150,
                    "evals": 1},
        "digits": {"data.batch_size": 16, "train.steps": 150, "evals": 2},
    },
}


def apply_task_settings(c: ConfigDict, task: str, size: str) -> None:
    """Set `c.data.task` and the task's `TASK_SETTINGS[size]` values (evaluation cadence
    included) on a configs/fpt.py config."""
    if size not in TASK_SETTINGS:
        raise ValueError(f"unknown task size {size!r}; choose one of {sorted(TASK_SETTINGS)}")
    if task not in TASK_SETTINGS[size]:
        raise ValueError(f"task {task!r} has no {size!r} settings; choose one of "
                         f"{sorted(TASK_SETTINGS[size])}")
    c.data.task = task
    values = dict(TASK_SETTINGS[size][task])
    evals = values.pop("evals")
    for path, value in values.items():
        section, key = path.split(".")
        c[section][key] = value
    every = max(1, c.train.steps // evals)
    c.train.eval_every = c.train.checkpoint_every = every
    c.train.log_every = min(50, every)


@dataclasses.dataclass
class Split:
    """An in-memory split: inputs (N, L[, I]) and labels (N[, T])."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------- bit tasks


def bit_memory(rng: np.random.Generator, batch: int, n_bits: int, patterns: int,
               patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (B, (patterns+1)·n_bits/patch, patch) in {-1, 0, 1}, labels (B, n_bits) in {0, 1})."""
    bits = rng.choice(np.array([-1.0, 1.0], np.float32), size=(batch, patterns, n_bits))
    which = rng.integers(patterns, size=batch)
    target = bits[np.arange(batch), which]
    query = target * (rng.random((batch, n_bits)) >= 0.5)
    x = np.concatenate([bits, query[:, None]], axis=1)
    return x.reshape(batch, -1, patch), (target > 0).astype(np.int32)


def bit_xor(rng: np.random.Generator, batch: int, n_bits: int,
            patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (B, 2·n_bits/patch, patch) in {0, 1}, labels (B, n_bits) = XOR of the two strings)."""
    bits = rng.integers(2, size=(batch, 2, n_bits))
    x = bits.astype(np.float32).reshape(batch, -1, patch)
    return x, np.bitwise_xor(bits[:, 0], bits[:, 1]).astype(np.int32)


# ---------------------------------------------------------------------------- images


def patches(images_BHWC: np.ndarray, p: int) -> np.ndarray:
    """(B, H, W, C) → (B, (H/p)(W/p), p·p·C), as einops
    'b (h p1) (w p2) c -> b (h w) (p1 p2 c)' (the official code's rearrange)."""
    B, H, W, C = images_BHWC.shape
    x = images_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


@dataclasses.dataclass
class Augmentation:
    """One draw of the official CIFAR augmentation per image (B,): the crop's top-left corner
    in the zero-padded image, whether to mirror, the rotation angle (counter-clockwise)."""

    top: np.ndarray       # int (B,) in [0, 2·CROP_PADDING]
    left: np.ndarray      # int (B,) in [0, 2·CROP_PADDING]
    flip: np.ndarray      # bool (B,), probability 0.5
    degrees: np.ndarray   # float (B,) uniform in [-MAX_DEGREES, MAX_DEGREES]

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> "Augmentation":
        top, left = rng.integers(2 * CROP_PADDING + 1, size=(2, n))
        return cls(top, left, rng.random(n) < 0.5, rng.uniform(-MAX_DEGREES, MAX_DEGREES, n))

    def rows(self, index: slice) -> "Augmentation":
        return Augmentation(self.top[index], self.left[index], self.flip[index],
                            self.degrees[index])


def augment(images_BHWC: np.ndarray, a: Augmentation) -> np.ndarray:
    """RandomCrop(H, padding=CROP_PADDING), then RandomHorizontalFlip, then RandomRotation
    (nearest pixel, about the image centre, zero fill) with the draws of `a`."""
    B, H, W, _ = images_BHWC.shape
    pad = CROP_PADDING
    padded = np.pad(images_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = (a.top[:, None] + np.arange(H))[:, :, None]
    cols = (a.left[:, None] + np.arange(W))[:, None, :]
    x = padded[np.arange(B)[:, None, None], rows, cols]
    x = np.where(a.flip[:, None, None, None], x[:, :, ::-1], x)
    return np.stack([ndimage.rotate(img, angle, axes=(1, 0), reshape=False, order=0,
                                    mode="grid-constant", cval=0.0)
                     for img, angle in zip(x, a.degrees)])


def image_inputs(task: str, images_BHWC: np.ndarray,
                 augmentation: Augmentation | None = None) -> np.ndarray:
    """uint8 images → the task's float32 patches, in the official order: pixels / 255,
    grayscale, the augmentation if given, per-channel normalization, patches."""
    _, p, gray, (mean, std) = IMAGE_TASKS[task]
    x = images_BHWC.astype(np.float32) / 255.0
    if gray:
        x = x @ LUMA[:, None]
    if augmentation is not None:
        x = augment(x, augmentation)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return patches(x, p)


def image_splits(task: str, data_dir: str, val_fraction: float,
                 raw_train: bool = False) -> dict[str, Split]:
    """The task's splits as patches; `raw_train`: the train split as its uint8 images
    (N, H, W, C), for `image_inputs` to augment batch by batch."""
    name = IMAGE_TASKS[task][0]
    builder = images.load_builder(name, data_dir)
    h = builder.info.features["image"].shape[0]

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            ex = images.Examples(builder, split, h)
        except AssertionError:  # tfds's "Dataset ... could not find data in DIR"
            raise images.not_prepared(name, data_dir) from None
        return ex.take(np.arange(len(ex)))

    x, y = load("train")
    order = np.random.default_rng(0).permutation(len(y))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], np.sort(order[n_val:])
    tx, ty = load("test")
    return {"train": Split(x[train] if raw_train else image_inputs(task, x[train]), y[train]),
            "validation": Split(image_inputs(task, x[val]), y[val]),
            "test": Split(image_inputs(task, tx), ty)}


# ---------------------------------------------------------------------------- token tasks


def listops_splits(d: ConfigDict) -> tuple[dict[str, Split], int]:
    """(splits, rows cut at seq_len) of generated ListOps or of LRA's files."""
    out, cut = {}, 0
    for i, split in enumerate(("train", "validation", "test")):
        if d.listops_source == "generate":
            n = {"train": d.listops_train, "validation": d.listops_eval,
                 "test": d.listops_eval}[split]
            src, y = listops.generate(n, seed=d.generator_seed * 3 + i,
                                      min_length=d.listops_min_length,
                                      max_length=d.listops_max_length,
                                      parens=d.listops_parens)
        elif d.listops_source == "lra":
            src, y = listops.read_tsv(d.data_dir, {"validation": "val"}.get(split, split))
        else:
            raise ConfigError(f"unknown config.data.listops_source {d.listops_source!r}; "
                              "choose generate or lra")
        ids, c = listops.encode(src, d.seq_len)
        out[split], cut = Split(ids, y), cut + c
    return out, cut


LONG_SEQUENCES = ("skip", "truncate")


def homology_splits(data_dir: str, seq_len: int,
                    long_sequences: str = "skip") -> tuple[dict[str, Split], dict[str, int]]:
    """(splits, examples skipped per split) of TAPE remote homology,
    `remote_homology_{train,valid,test_fold_holdout}` as TAPE's LMDB databases or JSON lists
    (bigs_jax.data.tape): <cls> + residues + <sep>, 0-padded to seq_len.

    Longer examples are left out with `long_sequences="skip"`, as the official code does (it
    draws another batch while any sequence of one is longer than 1024 tokens, in training and
    evaluation alike: 97.39% of TAPE's train split is kept, and the paper multiplies its
    accuracies by that fraction), or cut at seq_len with "truncate"."""
    if long_sequences not in LONG_SEQUENCES:
        raise ConfigError(f"unknown config.data.long_sequences {long_sequences!r}; "
                          f"choose one of {LONG_SEQUENCES}")
    folder, fmt = tape.locate(data_dir)
    splits, skipped = {}, {}
    for split, name in HOMOLOGY_SPLITS.items():
        records = tape.read_split(folder, fmt, name)
        if long_sequences == "skip":
            kept = [r for r in records if tape.length(r) <= seq_len]
            if not kept:
                raise ConfigError(
                    f"every example of remote_homology_{name} is longer than "
                    f"config.data.seq_len {seq_len} tokens (<cls> and <sep> included); raise "
                    "seq_len or set config.data.long_sequences=truncate")
            skipped[split], records = len(records) - len(kept), kept
        splits[split] = Split(*tape.encode(records, seq_len))
    return splits, skipped


# The smallest value each task's data keys can take (the keys every source shares, batch
# sizes and steps, `train.config.check_values` covers).
_LOWEST = {
    "bit-memory": {"n_bits": 1, "patch_size": 1, "num_patterns": 1, "eval_examples": 1},
    "bit-xor": {"n_bits": 1, "patch_size": 1, "eval_examples": 1},
    "listops": {"seq_len": 1, "listops_train": 1, "listops_eval": 1, "listops_min_length": 1},
    "remote-homology": {"seq_len": 3},  # <cls>, one residue, <sep>
}


def check_data(d: ConfigDict) -> None:
    """Raise ConfigError naming every `config.data` value of the task that no run can use,
    before anything is generated or read."""
    if d.task not in TASKS:
        raise ConfigError(f"unknown config.data.task {d.task!r}; choose one of {TASKS}")
    problems = []
    for key, low in _LOWEST.get(d.task, {}).items():
        value = d.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"config.data.{key}={value} (must be an integer >= {low})")
    if d.task in ("bit-memory", "bit-xor") and not problems and d.n_bits % d.patch_size:
        problems.append(f"config.data.n_bits={d.n_bits} is not a multiple of "
                        f"config.data.patch_size={d.patch_size}")
    if d.task == "listops" and not problems:
        if d.listops_min_length > d.listops_max_length:
            problems.append(f"config.data.listops_min_length={d.listops_min_length} exceeds "
                            f"config.data.listops_max_length={d.listops_max_length}")
    if d.task in IMAGE_TASKS and not 0 < d.val_fraction < 1:
        problems.append(f"config.data.val_fraction={d.val_fraction} (the share of train "
                        "carved out for validation; must be in (0, 1))")
    if problems:
        raise ConfigError(f"impossible {d.task} data values: {'; '.join(problems)}; pass "
                          "values in range with --config.data.<key>=...")


# ---------------------------------------------------------------------------- the source


class FPTSource:
    """`config.data.source = "fpt"` (see the module docstring)."""

    def __init__(self, config: ConfigDict):
        d = self.d = config.data
        check_data(d)
        self.task, self.splits, self.augment = d.task, {}, False
        self.skipped: dict[str, int] = {}   # examples left out per split (long_sequences)
        self.generated = d.task in ("bit-memory", "bit-xor")
        if self.generated:
            self.splits = {s: Split(*self._draw(np.random.default_rng([d.generator_seed, k]),
                                                d.eval_examples))
                           for k, s in ((1, "validation"), (2, "test"))}
            kind, dim, classes = "continuous", d.patch_size, 2
        elif d.task == "listops":
            self.splits, cut = listops_splits(d)
            if cut:
                print(f"listops: {cut} examples longer than seq_len {d.seq_len} were cut",
                      flush=True)
            kind, dim, classes = "tokens", len(listops.VOCAB), 10
        elif d.task == "remote-homology":
            self.splits, self.skipped = homology_splits(d.data_dir, d.seq_len,
                                                        d.get("long_sequences", "skip"))
            if any(self.skipped.values()):
                print("remote-homology: examples longer than seq_len "
                      f"{d.seq_len} left out (config.data.long_sequences=skip): "
                      + ", ".join(f"{s} {n} of {n + len(self.splits[s])}"
                                  for s, n in self.skipped.items()), flush=True)
            kind, dim, classes = "tokens", len(TAPE_VOCAB), HOMOLOGY_CLASSES
        else:
            # The official code augments CIFAR's training images: keep them as uint8 and
            # build each batch's patches after its augmentation (train_batches).
            self.augment = bool(d.augment) and d.task in AUGMENTED_TASKS
            self.splits = image_splits(d.task, d.data_dir, d.val_fraction,
                                       raw_train=self.augment)
            kind, dim, classes = "continuous", self.splits["test"].inputs.shape[-1], 10
        ref = self.splits["test"]
        predictions = ref.labels.shape[1] if ref.labels.ndim == 2 else 1
        self.overrides = {"input_kind": kind, "input_dim": int(dim),
                          "num_tokens": int(ref.inputs.shape[1]), "num_classes": classes,
                          "predictions": int(predictions),
                          # bit tasks: each of the last n_bits/patch_size positions gives
                          # `patch_size` bits (the official `ratio`)
                          "ratio": predictions // d.patch_size if self.generated else 1}

    def _draw(self, rng: np.random.Generator, n: int):
        d = self.d
        if self.task == "bit-memory":
            return bit_memory(rng, n, d.n_bits, d.num_patterns, d.patch_size)
        return bit_xor(rng, n, d.n_bits, d.patch_size)

    def model_overrides(self) -> dict:
        return dict(self.overrides)

    def _batch(self, split: Split, index: np.ndarray, weights=None) -> dict:
        return {"inputs": split.inputs[index], "labels": split.labels[index],
                "example_weights": np.ones(len(index), np.float32) if weights is None
                else weights}

    def train_batches(self, start_step: int) -> Iterator[dict]:
        d, n, p = self.d, jax.process_count(), jax.process_index()
        if self.generated:
            step = start_step
            while True:  # a pure function of (seed, step): resuming needs no replay
                x, y = self._draw(np.random.default_rng([d.seed, 3, step]), d.batch_size)
                k = d.batch_size // n
                yield self._batch(Split(x[p * k:(p + 1) * k], y[p * k:(p + 1) * k]),
                                  np.arange(k))
                step += 1
        train, k, step = self.splits["train"], d.batch_size // n, start_step
        for index in train_indices(len(train), d.batch_size, seed=d.seed,
                                   start_step=start_step, shard_index=p, num_shards=n):
            batch = self._batch(train, index)
            if self.augment:  # draws for the global batch from (seed, step); this host's rows
                a = Augmentation.draw(np.random.default_rng([d.seed, 4, step]), d.batch_size)
                batch["inputs"] = image_inputs(self.task, batch["inputs"],
                                               a.rows(slice(p * k, (p + 1) * k)))
            yield batch
            step += 1

    def eval_batches(self, split: str, limit: int = 0) -> list[dict]:
        """The split in order, global batches of eval_batch_size, the last padded with
        weight-0 rows; this host's rows of each."""
        data, g = self.splits[split], self.d.eval_batch_size
        n, hosts, p = len(data), jax.process_count(), jax.process_index()
        k = g // hosts
        count = -(-n // g) if not limit else min(limit, -(-n // g))
        out = []
        for b in range(count):
            pos = b * g + p * k + np.arange(k)
            out.append(self._batch(data, np.minimum(pos, n - 1), (pos < n).astype(np.float32)))
        return out

    def iterators(self, start_step: int):
        return (self.train_batches(start_step),
                self.eval_batches(self.d.eval_split, self.d.get("eval_batches", 0)))

    def score(self, step: int, predict: Callable[[dict], np.ndarray]) -> dict[str, float]:
        """Accuracy on validation and test; saved as `dev/step_N.json` under scores_dir."""
        scores = {}
        for split in ("validation", "test"):
            data = self.splits[split]
            logits = np.concatenate([predict(b) for b in self.eval_batches(split)])[:len(data)]
            right = np.argmax(logits, axis=-1) == data.labels
            scores[split] = {"accuracy": float(right.mean())}
            if right.ndim == 2:
                scores[split]["exact"] = float(right.all(axis=1).mean())
            if self.skipped.get(split):  # the left-out examples counted as wrong (the paper's
                scores[split]["accuracy_all"] = float(  # ×0.9739 correction, exactly)
                    right.sum() / (len(data) + self.skipped[split]))
        write_scores(self.d.get("scores_dir") or "", step, scores, {})
        return {f"{s}/{m}": v for s, ms in scores.items() for m, v in ms.items()}


def data_source(config: ConfigDict) -> FPTSource:
    return FPTSource(config)


registry.register("fpt", data_source)
