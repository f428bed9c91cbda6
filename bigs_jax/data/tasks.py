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

import functools

import seqio
import tensorflow as tf

from bigs_jax.data import corpus, hide_accelerators_from_tensorflow, preprocessors, vocab

hide_accelerators_from_tensorflow()

EMBEDDED_MLM = "embedded_mlm"
EMBEDDED_LM = "embedded_lm"
OBJECTIVES = ("mlm", "lm")


def _embedded_dataset_fn(split: str, shuffle_files: bool) -> tf.data.Dataset:
    del shuffle_files  # document order is fixed: row boundaries depend on it
    texts = [doc.text for doc in corpus.documents(split)]
    return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, tf.string)})


def embedded_source() -> seqio.FunctionDataSource:
    """The embedded corpus as a SeqIO source of `{"text": document}` examples."""
    return seqio.FunctionDataSource(_embedded_dataset_fn, splits=corpus.SPLITS)


def _preprocessors(objective: str) -> list:
    steps = [
        functools.partial(seqio.preprocessors.rekey, key_map={"input_ids": "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    ]
    if objective == "mlm":
        return steps + [preprocessors.chunk_for_mlm]
    return steps + [preprocessors.chunk_for_lm, preprocessors.causal_lm]


def register_text_task(
    name: str,
    source: seqio.DataSource,
    *,
    objective: str,
    vocabulary: seqio.Vocabulary,
) -> seqio.Task:
    """Registers (once) a pretraining task over a source of `{"text": str}` examples.

    Registering the same name again with the same objective and vocabulary returns the
    existing task, so modules that register tasks can be imported or reloaded freely.

    Args:
        name: task name for `seqio.get_mixture_or_task` and `pipeline.make_iterator`.
        source: a SeqIO source yielding one document per example under "text".
        objective: "mlm" (unmasked [CLS]/[SEP] rows) or "lm" (next-token examples).
        vocabulary: a SentencePiece vocabulary with [CLS], [SEP], [MASK] (see `vocab`).

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
        )
        if not same:
            raise ValueError(
                f"Task {name!r} is already registered with other features or another "
                "vocabulary; register this one under another name."
            )
        return task
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=_preprocessors(objective),
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


register_embedded_tasks()
