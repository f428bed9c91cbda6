"""SentencePiece vocabularies usable by SeqIO, and the ids of their special tokens.

The embedded vocabulary (`assets/embedded_spm.model`, shipped with the package) is a byte-level
BPE SentencePiece model of 8,192 pieces trained on the 'train' split of the embedded corpus
(`bigs_jax.data.corpus`). Rebuild it, bit for bit, with

    python -m bigs_jax.data.vocab --build     # writes bigs_jax/data/assets/embedded_spm.model
    python -m bigs_jax.data.vocab --check     # exit status 1 if a rebuild would differ

(the rebuild matches only under the interpreter whose corpus text the asset was built from,
see `corpus.REFERENCE_FINGERPRINT`). Its ids:

    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]   5..260 the 256 byte pieces   261.. BPE

[CLS] and [SEP] are control symbols (never produced from text; they decode to nothing); [MASK]
is user-defined, so the text "[MASK]" encodes to it, for fill-in-the-blank demos. There is no
BOS/EOS piece (SeqIO features use `add_eos=False`). Byte fallback is on, so any text encodes
without [UNK], and normalization is the identity, so `decode(encode(s)) == s` for any string
without leading, trailing or repeated spaces.

Only `embedded_vocabulary` and `sentencepiece_vocabulary` import SeqIO (and so TensorFlow);
the special ids and `EMBEDDED_VOCAB_SIZE` are cheap to read from a model config.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import pathlib
import sys
from typing import TYPE_CHECKING

import sentencepiece as spm

from bigs_jax import fs
from bigs_jax.data import corpus, hide_accelerators_from_tensorflow

if TYPE_CHECKING:
    import seqio

EMBEDDED_MODEL_PATH = pathlib.Path(__file__).parent / "assets" / "embedded_spm.model"
EMBEDDED_VOCAB_SIZE = 8192
# Where a workdir records its vocabulary (train.py and convert write it): a WordPiece vocab.txt
# (with tokenizer_config.json's do_lower_case), or a SentencePiece model (`spm.model`; HF
# directories name theirs `tokenizer.model`).
TOKENIZER_DIR = "tokenizer"
WORKDIR_VOCAB_FILES = ("vocab.txt", "spm.model", "tokenizer.model", "vocab.json")

# Piece names looked up in any SentencePiece model; BERT-style first, then ALBERT/XLNet-style.
_PIECE_NAMES = {
    "cls_id": ("[CLS]", "<cls>"),
    "sep_id": ("[SEP]", "<sep>"),
    "mask_id": ("[MASK]", "<mask>"),
}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens of a vocabulary, and its size.

    Attributes:
        pad_id: padding; always 0 (SeqIO pads with 0).
        unk_id: unknown piece; never produced by the embedded vocabulary (byte fallback).
        cls_id: [CLS], first token of every MLM row.
        sep_id: [SEP], after every document and at the end of every MLM row.
        mask_id: [MASK], the MLM corruption token.
        vocab_size: number of ids, i.e. the embedding table size a model needs.
    """

    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int

    @property
    def all(self) -> tuple[int, ...]:
        """The special ids (pad, unk, cls, sep, mask): never selected for masking."""
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)


def _special_ids_of(processor: spm.SentencePieceProcessor, where: str) -> SpecialIds:
    found = {}
    for field, names in _PIECE_NAMES.items():
        ids = [processor.piece_to_id(n) for n in names]
        # piece_to_id answers unk_id for a piece the model lacks.
        hits = [i for i in ids if i != processor.unk_id()]
        if not hits:
            raise ValueError(
                f"SentencePiece model {where} has no {names[0]} piece; train it with "
                "--control_symbols=[CLS],[SEP] --user_defined_symbols=[MASK] (or <cls>, <sep>, "
                "<mask>)."
            )
        found[field] = hits[0]
    if processor.pad_id() != 0:
        raise ValueError(
            f"SentencePiece model {where} has pad_id={processor.pad_id()}, but SeqIO pads with "
            "id 0; retrain it with --pad_id=0."
        )
    return SpecialIds(
        pad_id=0,
        unk_id=processor.unk_id(),
        vocab_size=processor.get_piece_size(),
        **found,
    )


def special_ids(vocabulary: seqio.Vocabulary) -> SpecialIds:
    """Returns the special ids of a SeqIO SentencePiece or WordPiece vocabulary.

    A WordPiece vocabulary (`wordpiece.WordPieceVocabulary`) carries its own, looked up in its
    vocab.txt; a SentencePiece one is read here.

    Raises:
        ValueError: if the model lacks [CLS], [SEP] or [MASK], or does not pad with id 0.
    """
    own = getattr(vocabulary, "special_ids", None)
    if isinstance(own, SpecialIds):
        return own
    return _special_ids_of(vocabulary.tokenizer, vocabulary.sentencepiece_model_file)


def workdir_vocabulary_file(workdir: str | pathlib.Path) -> str | None:
    """The vocabulary file a workdir (local or a gs://... URI) records in `tokenizer/`, or
    None."""
    for name in WORKDIR_VOCAB_FILES:
        path = fs.join(str(workdir), TOKENIZER_DIR, name)
        if fs.isfile(path):
            return path
    return None


def is_sentencepiece_file(path: str | pathlib.Path) -> bool:
    """Whether `path` holds a SentencePiece model (a binary protobuf) rather than a WordPiece
    vocab.txt (UTF-8 text): by its `.model` suffix, else by its first bytes."""
    if str(path).endswith(".model"):
        return True
    try:
        head = fs.read_bytes(str(path))[:4096]
    except OSError:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # not merely a character cut at the 4096-byte edge
    return b"\x00" in head


def vocabulary_files(vocabulary) -> dict[str, bytes]:
    """The files that record `vocabulary` in a workdir's `tokenizer/` ({} for one that cannot
    be written down): a WordPiece vocabulary's vocab.txt and do_lower_case, a SentencePiece
    one's model."""
    if hasattr(vocabulary, "vocab_file") and hasattr(vocabulary, "pieces"):  # WordPiece
        settings = f'{{"do_lower_case": {str(bool(vocabulary.lower_case)).lower()}}}\n'
        return {"vocab.txt": "".join(f"{p}\n" for p in vocabulary.pieces).encode("utf-8"),
                "tokenizer_config.json": settings.encode()}
    model = getattr(vocabulary, "sp_model", None)
    return {"spm.model": model} if isinstance(model, bytes) else {}


def end_of_text_id(vocabulary) -> int:
    """The id that ends a document (where generation stops): a byte-level BPE vocabulary's
    `<|endoftext|>`, else [SEP] (the LM tasks end every document with it)."""
    own = getattr(vocabulary, "end_of_text_id", None)
    return own if isinstance(own, int) else special_ids(vocabulary).sep_id


@functools.cache
def embedded_special_ids() -> SpecialIds:
    """Special ids of the embedded vocabulary (reads the model file; no TensorFlow)."""
    return _special_ids_of(_load_processor(EMBEDDED_MODEL_PATH), str(EMBEDDED_MODEL_PATH))


def _load_processor(path: pathlib.Path | str) -> spm.SentencePieceProcessor:
    if fs.is_uri(str(path)) and fs.isfile(str(path)):
        return spm.SentencePieceProcessor(model_proto=fs.read_bytes(str(path)))
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SentencePiece model {path} does not exist; pass the path of a .model file "
            "(the embedded one is rebuilt with `python -m bigs_jax.data.vocab --build`)."
        )
    return spm.SentencePieceProcessor(model_file=str(path))


def sentencepiece_vocabulary(path: str | pathlib.Path) -> seqio.SentencePieceVocabulary:
    """A SeqIO vocabulary from a user's SentencePiece model file.

    Args:
        path: a SentencePiece `.model` file with pad id 0 and [CLS], [SEP], [MASK] pieces.

    Returns:
        A `seqio.SentencePieceVocabulary` (its `encode_tf` runs inside tf.data graphs).

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if the model lacks the special pieces or pads with another id.
    """
    path = str(path) if fs.is_uri(str(path)) else pathlib.Path(path)
    _special_ids_of(_load_processor(path), str(path))  # fail early with a clear message
    # SeqIO imports TensorFlow: keep both out of cheap imports of this module.
    import seqio  # pylint: disable=import-outside-toplevel

    hide_accelerators_from_tensorflow()

    return seqio.SentencePieceVocabulary(str(path))


@functools.cache
def embedded_vocabulary() -> seqio.SentencePieceVocabulary:
    """The vocabulary shipped with the package (8,192 pieces), as a SeqIO vocabulary."""
    return sentencepiece_vocabulary(EMBEDDED_MODEL_PATH)


def train_embedded_model() -> bytes:
    """Trains the embedded SentencePiece model on the corpus 'train' split; returns its bytes.

    Deterministic: one thread, the whole split in a fixed order, no sampling.
    """
    texts = [doc.text for doc in corpus.documents("train")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=EMBEDDED_VOCAB_SIZE,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        control_symbols=["[CLS]", "[SEP]"],
        user_defined_symbols=["[MASK]"],
        max_sentence_length=1 << 20,  # documents are single lines of up to ~60k characters
        input_sentence_size=0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m bigs_jax.data.vocab --build | --check`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--build", action="store_true", help="train and write the asset")
    group.add_argument("--check", action="store_true", help="fail if a rebuild would differ")
    args = parser.parse_args(argv)
    model = train_embedded_model()
    if args.build:
        EMBEDDED_MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
        EMBEDDED_MODEL_PATH.write_bytes(model)
        print(f"wrote {EMBEDDED_MODEL_PATH} ({len(model)} bytes)")
        return 0
    same = EMBEDDED_MODEL_PATH.is_file() and EMBEDDED_MODEL_PATH.read_bytes() == model
    print(f"{EMBEDDED_MODEL_PATH}: {'matches' if same else 'DIFFERS FROM'} a fresh build")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
