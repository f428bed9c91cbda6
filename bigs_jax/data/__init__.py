"""Data: the embedded corpus, vocabularies, SeqIO tasks and the host-side batch iterator.

    from bigs_jax.data import pipeline
    batches = pipeline.make_iterator("embedded_mlm", split="train", batch_size=32, seq_len=128,
                                     seed=0)
    batch = next(batches)   # numpy: input_ids, labels, loss_weights, attention_mask, ...

Modules: `registry` (the DataSource protocol the train loop reads, sources by name),
`seqio_source` and `images` (the "seqio" and "images" sources), `corpus` (the default text, no
download), `vocab` (SentencePiece vocabularies and their special ids), `preprocessors` (TF ops:
chunking, BERT masking, causal-LM shift), `tasks` and `mixtures` (SeqIO registration; task and
mixture specs), `pipeline` (deterministic, resumable, sharded numpy batches), `streaming` (the
same batches streamed, for corpora larger than host memory). Importing this package is
cheap; TensorFlow loads only with the modules that need it.
"""

from __future__ import annotations

import logging


def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (used only for input pipelines) off the GPUs, which belong to JAX.

    Without this, TensorFlow grabs GPU memory as soon as its runtime starts. Safe to call often;
    it is a no-op once TensorFlow's devices are initialized.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Devices already initialized (e.g. the user touched TF first): nothing left to do.
        logging.debug("TensorFlow devices already initialized; leaving them as they are.")
