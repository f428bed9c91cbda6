"""SeqIO tasks for pretraining; importing this module registers the embedded-corpus tasks.

- `embedded_mlm`: the embedded corpus (`corpus`) as `[CLS] ... [SEP]` rows, feature
  `input_ids` only. The rows are *unmasked*: masking is random and must differ per epoch, so it
  is applied after the epoch repeat, by `pipeline.make_iterator` or, for direct SeqIO users, by
  `preprocessors.bert_mlm` on the repeated dataset. Putting it in the task would freeze one mask
  per row whenever the caller repeats the task's output.
- `embedded_lm`: the same corpus as next-token examples (`input_ids`, `labels`, `loss_weights`,
  `attention_mask`); deterministic, so complete inside the task.

Both read splits 'train' and 'validation', in a fixed document order (shuffling happens on rows,
in the pipeline). Row length comes from SeqIO's `sequence_length` (`{"input_ids": L, ...}`).

A task without `labels` is an MLM task to the pipeline; `register_text_task` builds either kind
from any SeqIO source of `{"text": ...}` examples, for instance with another vocabulary.
"""

from __future__ import annotations

import hashlib
import os

import seqio
import tensorflow as tf

from bigs_jax import fs
from bigs_jax.data import (
    bpe,
    corpus,
    hide_accelerators_from_tensorflow,
    preprocessors,
    sources,
    vocab,
    wordpiece,
)

hide_accelerators_from_tensorflow()

EMBEDDED_MLM = "embedded_mlm"
EMBEDDED_LM = "embedded_lm"
OBJECTIVES = ("mlm", "lm")


def _embedded_dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    # Document order is fixed (row boundaries depend on it); a seeded stream still shuffles
    # rows (`streaming`).
    del shuffle_files, seed
    texts = [doc.text for doc in corpus.documents(split)]
    return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, tf.string)})


def embedded_source() -> seqio.FunctionDataSource:
    """The embedded corpus as a SeqIO source of `{"text": document}` examples."""
    return seqio.FunctionDataSource(_embedded_dataset_fn, splits=corpus.SPLITS)


def _tokenize(dataset: tf.data.Dataset, output_features, batch_size: int = 64):
    """`{"text"}` -> `{"input_ids"}`, tokenizing batches of documents (the same ids as one by
    one, several times faster for tensorflow-text tokenizers)."""
    vocabulary = output_features["input_ids"].vocabulary
    return dataset.batch(batch_size).map(
        lambda ex: {"input_ids": tf.cast(vocabulary.encode_tf(ex["text"]), tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    ).unbatch()


def _preprocessors(objective: str, pack: bool) -> list:
    steps = [_tokenize]
    if pack:
        split = preprocessors.split_for_mlm if objective == "mlm" else preprocessors.split_for_lm
        return steps + [split, _pack]
    if objective == "mlm":
        return steps + [preprocessors.chunk_for_mlm]
    return steps + [preprocessors.chunk_for_lm, preprocessors.causal_lm]


def _pack(dataset: tf.data.Dataset, sequence_length, output_features):
    del output_features
    return preprocessors.pack(dataset, sequence_length)


def register_text_task(
    name: str,
    source: seqio.DataSource,
    *,
    objective: str,
    vocabulary: seqio.Vocabulary,
    pack: bool = False,
) -> seqio.Task:
    """Registers (once) a pretraining task over a source of `{"text": str}` examples.

    Registering the same name again with the same objective and vocabulary returns the
    existing task, so modules that register tasks can be imported or reloaded freely.

    Args:
        name: task name for `seqio.get_mixture_or_task` and `pipeline.make_iterator`.
        source: a SeqIO source yielding one document per example under "text".
        objective: "mlm" (unmasked [CLS]/[SEP] rows) or "lm" (next-token examples).
        vocabulary: a SentencePiece (`vocab`) or WordPiece (`wordpiece`) vocabulary with
            [CLS], [SEP], [MASK].
        pack: one example per document piece, packed with `segment_ids` and `positions`
            (`preprocessors.pack`) instead of rows cut from the concatenated stream.

    Returns:
        The registered task.

    Raises:
        ValueError: on an unknown objective, or a name taken by a different task.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; use one of {OBJECTIVES}.")
    vocab.special_ids(vocabulary)  # fail at registration if the specials are missing
    feature = seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
    keys = ("input_ids",) if objective == "mlm" else ("input_ids", "labels")
    output_features = {k: feature for k in keys}
    if name in seqio.TaskRegistry.names():
        task = seqio.TaskRegistry.get(name)
        same = set(task.output_features) == set(keys) and all(
            f.vocabulary == vocabulary for f in task.output_features.values()
        ) and is_packed(task) == pack
        if not same:
            raise ValueError(
                f"Task {name!r} is already registered with other features or another "
                "vocabulary; register this one under another name."
            )
        return task
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=_preprocessors(objective, pack),
        output_features=output_features,
        metric_fns=[],
    )


def register_embedded_tasks(
    vocabulary: seqio.Vocabulary | None = None,
    *,
    mlm_name: str = EMBEDDED_MLM,
    lm_name: str = EMBEDDED_LM,
) -> tuple[seqio.Task, seqio.Task]:
    """Registers the MLM and causal-LM tasks over the embedded corpus.

    Args:
        vocabulary: defaults to the embedded vocabulary; with another one, also pass new names.
        mlm_name: name of the MLM task.
        lm_name: name of the causal-LM task.

    Returns:
        (MLM task, LM task).
    """
    vocabulary = vocabulary or vocab.embedded_vocabulary()
    source = embedded_source()
    return (
        register_text_task(mlm_name, source, objective="mlm", vocabulary=vocabulary),
        register_text_task(lm_name, source, objective="lm", vocabulary=vocabulary),
    )



def is_packed(task: seqio.Task) -> bool:
    """Whether a task's rows are packed (carry `segment_ids` and `positions`)."""
    return _pack in task.preprocessors


# ---------------------------------------------------------------------------- task specs

SPEC_FORMATS = ("text", "jsonl", "tfrecord", "tfds", "embedded", "mix")
_SPEC_OPTIONS = {"vocab", "cased", "pack", "text_key", "name", "data_dir", "recipe"}
SPEC_HELP = (
    "FORMAT_OBJECTIVE:key=value,...  with FORMAT in text|jsonl|tfrecord|tfds|embedded|mix and "
    "OBJECTIVE in mlm|lm; files: SPLIT=GLOB per split (a bare GLOB is train=GLOB); tfds: "
    "name=c4/en,data_dir=DIR; mix: recipe=bigs|m2_long,data_dir=DIR; all: vocab=PATH "
    "(vocab.txt: WordPiece, vocab.json or a dir with merges.txt: GPT-2 byte-level BPE, else "
    "SentencePiece model), cased=1, pack=1, text_key=KEY"
)


_SPEC_TASKS: dict[str, str] = {}  # spec -> registered task name


def _spec_vocabulary(path: str | None, cased: bool) -> seqio.Vocabulary:
    if not path:
        return vocab.embedded_vocabulary()
    return load_vocabulary(path, lower_case=not cased)


def load_vocabulary(path: str | os.PathLike, lower_case: bool | None = None) -> seqio.Vocabulary:
    """The vocabulary of a file or a workdir, as a SeqIO vocabulary.

        load_vocabulary("workdirs/quickstart")     # what train.py recorded in tokenizer/
        load_vocabulary("/path/vocab.txt")         # WordPiece
        load_vocabulary("/path/spm.model")         # SentencePiece
        load_vocabulary("/path/vocab.json")        # GPT-2 byte-level BPE (merges.txt beside)

    A SentencePiece model is told from a WordPiece vocab.txt by its content, whatever its name.
    `lower_case` (WordPiece only) defaults to tokenizer_config.json's do_lower_case beside the
    file, else True (bert-*-uncased).

    Raises:
        FileNotFoundError: no such file, or a directory that records no vocabulary.
        ValueError: a vocabulary without the special pieces the pipeline needs.
    """
    path = os.fspath(path)
    if path.endswith(".json") or fs.isfile(fs.join(path, "merges.txt")):
        return bpe.ByteLevelBPEVocabulary(path)  # GPT-2 vocab.json + merges.txt
    if fs.isdir(path):
        found = vocab.workdir_vocabulary_file(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} records no vocabulary (no {vocab.TOKENIZER_DIR}/ with "
                f"{' or '.join(vocab.WORKDIR_VOCAB_FILES)}); pass the vocabulary file itself")
        path = found
    if vocab.is_sentencepiece_file(path):
        return vocab.sentencepiece_vocabulary(path)
    if lower_case is None:
        settings = fs.join(fs.dirname(path), "tokenizer_config.json")
        lower_case = True
        if fs.isfile(settings):
            try:
                lower_case = bool(fs.read_json(settings).get("do_lower_case", True))
            except (ValueError, AttributeError):
                raise ValueError(f"{settings} is not a JSON object; fix or remove it "
                                 "(it only sets do_lower_case)") from None
    return wordpiece.WordPieceVocabulary(path, lower_case=lower_case)


def parse_spec(spec: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """'text_mlm:train=a*.txt,pack=1' -> ('text', 'mlm', {'train': 'a*.txt'}, {'pack': '1'})."""
    head, _, body = spec.partition(":")
    fmt, _, objective = head.rpartition("_")
    if fmt not in SPEC_FORMATS or objective not in OBJECTIVES:
        raise ValueError(f"{spec!r} is neither a registered task nor a task spec ({SPEC_HELP}).")
    splits, options = {}, {}
    for i, item in enumerate(filter(None, body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            if i:
                raise ValueError(f"Task spec {spec!r}: item {item!r} needs key=value.")
            key, value = "train", item
        (options if key in _SPEC_OPTIONS else splits)[key] = value
    if fmt == "tfds" and not options.get("name"):
        raise ValueError(f"Task spec {spec!r} names no tfds dataset; add name=c4/en (e.g.).")
    if fmt in ("text", "jsonl", "tfrecord") and not splits:
        raise ValueError(f"Task spec {spec!r} names no files; add train=GLOB (and "
                         "validation=GLOB).")
    return fmt, objective, splits, options


def get_task(name: str) -> seqio.Task | seqio.Mixture:
    """A registered task or mixture by name, registering a task spec on first use.

    Besides registered names (`embedded_mlm`, a `mixtures` recipe, a user's own), `name` can
    be a task spec, registered as `FORMAT_OBJECTIVE_<hash of the spec>` (SeqIO names allow
    no paths) and found again by the spec:

        text_mlm:/data/wikitext-2/wiki.test.tokens,validation=/data/wikitext-2/wiki.valid.tokens
        tfds_mlm:name=c4/en,data_dir=gs://bucket/tfds,vocab=/path/vocab.txt,pack=1
        jsonl_lm:train=/data/train-*.jsonl,validation=/data/val.jsonl,text_key=content
        embedded_lm:pack=1

    Mixture specs (`mix_mlm:recipe=bigs,...`) are `mixtures.get_task`'s, which also takes
    everything this function takes; the pipelines resolve names through it.

    Raises:
        ValueError: on an unknown name or a malformed spec.
        FileNotFoundError: on a glob that matches nothing or a missing vocabulary file.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in _SPEC_TASKS:
        return get_task(_SPEC_TASKS[name])
    try:
        fmt, objective, splits, options = parse_spec(name)
    except ValueError:
        if ":" in name:
            raise
        known = ", ".join(sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}))
        raise ValueError(f"Unknown task {name!r}; registered tasks: {known}; or a task spec "
                         f"({SPEC_HELP}).") from None
    if fmt == "mix":
        raise ValueError(f"{name!r} is a mixture spec; resolve it with "
                         "bigs_jax.data.mixtures.get_task.")
    if fmt == "tfds":
        source = sources.tfds_source(options["name"], data_dir=options.get("data_dir"),
                                     text_key=options.get("text_key"), splits=splits or None)
    elif fmt == "embedded":
        source = embedded_source()
    else:
        source = sources.file_source(fmt, splits, text_key=options.get("text_key", "text"))
    vocabulary = _spec_vocabulary(options.get("vocab"), options.get("cased", "0") == "1")
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    task = register_text_task(f"{fmt}_{objective}_{digest}", source, objective=objective,
                              vocabulary=vocabulary, pack=options.get("pack", "0") == "1")
    _SPEC_TASKS[name] = task.name
    return task


register_embedded_tasks()
