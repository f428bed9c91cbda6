"""Byte-level BPE vocabularies (GPT-2's `vocab.json` + `merges.txt`) as SeqIO vocabularies.

    from bigs_jax.data.bpe import ByteLevelBPEVocabulary
    vocabulary = ByteLevelBPEVocabulary("path/to/tokenizer")     # a dir, or its vocab.json
    vocabulary.encode("Hello world")       # GPT-2: [15496, 995], as GPT2TokenizerFast

The merges run in HF's `tokenizers` library (Rust; pinned in requirements.txt), set up as
`GPT2TokenizerFast` sets it up: the GPT-2 pre-tokenizer regex on raw bytes mapped to
printable characters (`ByteLevel(add_prefix_space=False)`), BPE with the file's merges, the
byte-level decoder, and `<|endoftext|>` as a special token (the text "<|endoftext|>" is that
one id). No normalization, so `decode(encode(s)) == s` for every string.

Inside tf.data the vocabulary runs through `tf.py_function` over whole batches of strings,
where `tokenizers` encodes in parallel outside the GIL (`bench/data.py` measures it against
HF's tokenizer). Special ids for the pipeline: pad 0 (SeqIO's; in GPT-2's vocabulary 0 is
"!", so a pad is told apart by the attention mask, not by its id), and [CLS], [SEP], [MASK]
and [UNK] all mapped to `<|endoftext|>`, GPT's document separator: these vocabularies are for
causal LMs, not MLM.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from bigs_jax.data import hide_accelerators_from_tensorflow, vocab

hide_accelerators_from_tensorflow()

END_OF_TEXT = "<|endoftext|>"


def files_of(path: str | os.PathLike) -> tuple[str, str]:
    """(vocab.json, merges.txt) of a tokenizer directory or of its vocab.json."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    vocab_json = os.path.join(path, "vocab.json") if os.path.isdir(path) else path
    merges = os.path.join(directory, "merges.txt")
    for f in (vocab_json, merges):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"byte-level BPE file {f} does not exist; pass a directory "
                                    "holding GPT-2's vocab.json and merges.txt (or the "
                                    "vocab.json beside merges.txt)")
    return vocab_json, merges


def build_tokenizer(vocab_json: str, merges: str) -> Tokenizer:
    """The `tokenizers` pipeline of HF `GPT2TokenizerFast` for these files."""
    tok = Tokenizer(models.BPE.from_file(vocab_json, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(END_OF_TEXT) is not None:
        tok.add_special_tokens([END_OF_TEXT])
    return tok


class ByteLevelBPEVocabulary(seqio.Vocabulary):
    """GPT-2-style byte-level BPE as a SeqIO vocabulary; ids equal HF `GPT2TokenizerFast`'s.

    Attributes:
      vocab_file, merges_file: the two files.
      end_of_text_id: `<|endoftext|>`'s id (None if the vocabulary lacks it).
      special_ids: the pipeline's `vocab.SpecialIds` (module docstring).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(extra_ids=0)
        self.vocab_file, self.merges_file = files_of(path)
        self._tok = build_tokenizer(self.vocab_file, self.merges_file)
        self.end_of_text_id = self._tok.token_to_id(END_OF_TEXT)
        size = self._tok.get_vocab_size()
        eot = size - 1 if self.end_of_text_id is None else self.end_of_text_id
        self.special_ids = vocab.SpecialIds(pad_id=0, unk_id=eot, cls_id=eot, sep_id=eot,
                                            mask_id=eot, vocab_size=size)
        digest = hashlib.sha256()
        for f in (self.vocab_file, self.merges_file):
            with open(f, "rb") as fh:
                digest.update(fh.read())
        self._digest = digest.hexdigest()

    @property
    def eos_id(self) -> int | None:
        return None  # SeqIO features use add_eos=False; documents end with sep_id

    @property
    def unk_id(self) -> int:
        return self.special_ids.unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _encode(self, s: str) -> Sequence[int]:
        return self._tok.encode(s).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many strings at once (parallel in `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _flat_encode(self, texts: np.ndarray):
        ids = self.encode_batch([t.decode("utf-8") for t in texts])
        lengths = np.asarray([len(x) for x in ids], np.int64)
        flat = np.fromiter((i for x in ids for i in x), np.int32, int(lengths.sum()))
        return flat, lengths

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        s = tf.convert_to_tensor(s, tf.string)
        scalar = s.shape.rank == 0
        flat, lengths = tf.py_function(lambda t: self._flat_encode(t.numpy()),
                                       [tf.reshape(s, [-1])], (tf.int32, tf.int64))
        flat.set_shape([None])
        ids = tf.RaggedTensor.from_row_lengths(flat, lengths)
        return ids[0] if scalar else ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)

        def decode(x):
            x = x.numpy()
            rows = [x] if x.ndim == 1 else list(x)
            return np.asarray([self._decode(r).encode("utf-8") for r in rows], object)

        text = tf.py_function(decode, [ids], tf.string)
        return tf.reshape(text, []) if ids.shape.rank == 1 else tf.reshape(text, [-1])

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteLevelBPEVocabulary) and self._digest == other._digest

    def __hash__(self) -> int:
        return hash(self._digest)

    def __repr__(self) -> str:
        return f"ByteLevelBPEVocabulary({self.vocab_file!r}, size={self.vocab_size})"
