"""BERT WordPiece vocabularies (a `vocab.txt`) as SeqIO vocabularies, with HF-equal ids.

    from bigs_jax.data.wordpiece import WordPieceVocabulary, encode_pair
    vocabulary = WordPieceVocabulary("path/to/vocab.txt")            # uncased (bert-base-uncased)
    vocabulary.encode("Héllo, 東京!")     # [7592, 1010, 1867, 1755, 999], as BertTokenizerFast
    ids, token_type_ids = encode_pair(vocabulary, "a question", "a passage", max_len=128)

Converted checkpoints (BERT, BiGS and M2-BERT all use the bert-base/large-uncased vocabulary)
must see the ids they were trained with, so every step reproduces HF `BertTokenizerFast`
(tokenizers' `BertNormalizer` + `BertPreTokenizer` + `WordPiece`) and runs in the tf.data graph:

1. Clean: tab/newline/carriage return and Unicode spaces become ' '; other control and format
   characters (category C) and U+FFFD are removed (HF's `clean_text`; tensorflow-text's own
   `BasicTokenizer` would turn them into spaces, splitting 'a\u200bb').
2. Uncased only: NFD, drop nonspacing marks (Mn), then lowercase with `tf.strings.lower`
   (HF's order; tensorflow-text's `lower_case=True` case-*folds* first, which turns 'ß' into
   'ss' where HF keeps 'ß'; ICU's context-dependent final sigma is bypassed the same way).
   Cased vocabularies skip this step, as HF does.
3. Split on whitespace; every punctuation character (ASCII symbols and Unicode P*) and every
   CJK ideograph becomes its own word (`tensorflow_text.regex_split`).
4. A word of more than 100 characters becomes [UNK] (HF counts characters; tensorflow-text's
   `max_bytes_per_word` counts bytes, so the length test happens here).
5. Greedy longest-match WordPiece with '##' continuations (`tensorflow_text
   .FastWordpieceTokenizer`); a word that cannot be covered becomes one [UNK].

Differences left: text that spells a special token ("[MASK]") is split into '[', 'mask', ']'
here, while HF maps it to the special id; `decode` joins pieces without HF's
`clean_up_tokenization_spaces` ("a , b" stays as is).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence

import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from bigs_jax.data import hide_accelerators_from_tensorflow, vocab

hide_accelerators_from_tensorflow()

MAX_CHARS_PER_WORD = 100  # HF's max_input_chars_per_word
SPECIAL_TOKENS = {"pad_id": "[PAD]", "unk_id": "[UNK]", "cls_id": "[CLS]", "sep_id": "[SEP]",
                  "mask_id": "[MASK]"}
CONTINUATION = "##"

# Whitespace of Rust's `char::is_whitespace` (HF's test) that is not a control character:
# control characters are removed instead, as HF does.
_SPACES = r"[\t\n\r \x{00A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]"
_REMOVED = r"[\p{C}\x{FFFD}]"
_PUNCTUATION = r"[!-/]|[:-@]|[\[-`]|[{-~]|\p{P}"
_CJK = "|".join(
    rf"[\x{{{a}}}-\x{{{b}}}]"
    for a, b in [("4E00", "9FFF"), ("3400", "4DBF"), ("20000", "2A6DF"), ("2A700", "2B73F"),
                 ("2B740", "2B81F"), ("2B820", "2CEAF"), ("F900", "FAFF"), ("2F800", "2FA1F")]
)
_DELIMITERS = rf" +|{_PUNCTUATION}|{_CJK}"
_KEPT_DELIMITERS = rf"{_PUNCTUATION}|{_CJK}"


def _read_vocab(vocab_file: str) -> tuple[str, ...]:
    if not tf.io.gfile.exists(vocab_file):
        raise FileNotFoundError(
            f"WordPiece vocab file {vocab_file} does not exist; pass a BERT vocab.txt (one "
            "piece per line), e.g. the one of bert-base-uncased."
        )
    try:
        with tf.io.gfile.GFile(vocab_file, "r") as f:
            # HF strips the trailing newline only; a piece may itself be a space-like character.
            return tuple(line.rstrip("\n") for line in f)
    except UnicodeDecodeError:
        raise ValueError(f"WordPiece vocab file {vocab_file} is not UTF-8 text (a SentencePiece "
                         "model? load it with data.tasks.load_vocabulary, which tells them "
                         "apart)") from None


class WordPieceVocabulary(seqio.Vocabulary):
    """A BERT `vocab.txt` as a SeqIO vocabulary; ids equal HF `BertTokenizerFast`'s.

    `encode_tf` accepts a scalar string (-> int32 [n]) or a batch of strings (-> int32
    RaggedTensor [B, None]); tokenizing batches is several times faster inside tf.data.
    There is no EOS (SeqIO features use `add_eos=False`); padding is [PAD] = 0.

    Attributes:
        vocab_file: path of the vocab.txt.
        lower_case: uncased tokenization (lowercase and strip accents), as bert-*-uncased.
        special_ids: the repo's `vocab.SpecialIds` ([PAD], [UNK], [CLS], [SEP], [MASK]).
    """

    def __init__(self, vocab_file: str | os.PathLike, lower_case: bool = True):
        super().__init__(extra_ids=0)
        self.vocab_file = os.fspath(vocab_file)
        self.lower_case = lower_case
        self._pieces = _read_vocab(self.vocab_file)
        index = {}
        for i, piece in enumerate(self._pieces):
            index.setdefault(piece, i)
        missing = [t for t in SPECIAL_TOKENS.values() if t not in index]
        if missing:
            raise ValueError(f"WordPiece vocab {self.vocab_file} lacks {missing}; use a BERT "
                             "vocab.txt with [PAD], [UNK], [CLS], [SEP] and [MASK].")
        if index["[PAD]"] != 0:
            raise ValueError(f"WordPiece vocab {self.vocab_file} has [PAD] at id "
                             f"{index['[PAD]']}, but SeqIO pads with id 0; put [PAD] first.")
        self._index = index
        self.special_ids = vocab.SpecialIds(
            vocab_size=len(self._pieces), **{k: index[t] for k, t in SPECIAL_TOKENS.items()}
        )
        self._digest = hashlib.sha256("\n".join(self._pieces).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ seqio interface

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def unk_id(self) -> int:
        return self.special_ids.unk_id

    @property
    def _base_vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def pieces(self) -> tuple[str, ...]:
        """The vocabulary's pieces, by id ('##' marks a word continuation)."""
        return self._pieces

    @functools.cached_property
    def _wordpiece(self) -> tf_text.FastWordpieceTokenizer:
        # Built eagerly (init_scope) even when first used while tracing a tf.data map:
        # its model buffer is then a constant every later graph can capture.
        with tf.init_scope():
            return self._build_wordpiece()

    def _build_wordpiece(self) -> tf_text.FastWordpieceTokenizer:
        return tf_text.FastWordpieceTokenizer(
            vocab=list(self._pieces),
            suffix_indicator=CONTINUATION,
            # Words are at most 100 characters when they get here, i.e. at most 400 bytes.
            max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
            token_out_type=tf.int32,
            unknown_token="[UNK]",
            no_pretokenization=True,
        )

    @functools.cached_property
    def _piece_table(self) -> tf.Tensor:
        with tf.init_scope():
            return tf.constant(self._pieces, tf.string)

    def words_tf(self, text: tf.Tensor) -> tf.RaggedTensor:
        """Normalized words (HF's normalizer + pre-tokenizer) of a batch [B] of strings."""
        text = tf.strings.regex_replace(text, _SPACES, " ")
        text = tf.strings.regex_replace(text, _REMOVED, "")
        if self.lower_case:
            text = tf_text.normalize_utf8(text, "NFD")
            text = tf.strings.regex_replace(text, r"\p{Mn}", "")
            # ICU lowercases a word-final capital sigma to 'ς'; HF maps each character alone.
            text = tf.strings.regex_replace(text, "\u03a3", "\u03c3")
            text = tf.strings.lower(text, encoding="utf-8")
        words = tf_text.regex_split(text, _DELIMITERS, _KEPT_DELIMITERS)
        too_long = tf.strings.length(words, unit="UTF8_CHAR") > MAX_CHARS_PER_WORD
        return tf.ragged.map_flat_values(
            lambda w, long: tf.where(long, "[UNK]", w), words, too_long
        )

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        s = tf.convert_to_tensor(s, tf.string)
        scalar = s.shape.rank == 0
        words = self.words_tf(tf.reshape(s, [-1]) if scalar else s)  # [B, words]
        ids = self._wordpiece.tokenize(words.flat_values)  # [all words, pieces]
        ids = words.with_flat_values(ids).merge_dims(1, 2)  # [B, pieces]
        return ids[0] if scalar else ids

    def _encode(self, s: str) -> Sequence[int]:
        return self._encode_tf(tf.constant(s, tf.string)).numpy().tolist()

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Pieces joined by spaces, '##' continuations glued on, [PAD] dropped; [B, L] or [L]."""
        ids = tf.convert_to_tensor(ids)
        pieces = tf.gather(self._piece_table, tf.cast(ids, tf.int32))
        pieces = tf.where(tf.equal(ids, self.special_ids.pad_id), "", pieces)
        text = tf.strings.reduce_join(pieces, axis=-1, separator=" ")
        text = tf.strings.regex_replace(text, " +##", "")
        return tf.strings.strip(tf.strings.regex_replace(text, " +", " "))

    def _decode(self, ids: Sequence[int]) -> str:
        if not len(ids):
            return ""
        return self._decode_tf(tf.constant(list(ids), tf.int32)).numpy().decode("utf-8")

    def __eq__(self, other) -> bool:
        return (isinstance(other, WordPieceVocabulary) and self._digest == other._digest
                and self.lower_case == other.lower_case)

    def __hash__(self) -> int:
        return hash((self._digest, self.lower_case))

    def __repr__(self) -> str:
        return (f"WordPieceVocabulary({self.vocab_file!r}, lower_case={self.lower_case}, "
                f"size={len(self._pieces)})")

    # ------------------------------------------------------------------ helpers

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece ('##ing', '[MASK]'); [UNK]'s id for a piece not in the vocab."""
        return self._index.get(piece, self.special_ids.unk_id)


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """HF's 'longest_first' truncation of a pair of id lists to `budget` tokens in all."""
    if len(a) + len(b) <= budget:
        return a, b
    short, long = sorted((len(a), len(b)))
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    if len(a) > len(b):
        short, long = long, short
    return a[:short], b[:long]


def encode_pair(
    vocabulary: WordPieceVocabulary,
    text_a: str,
    text_b: str | None = None,
    *,
    max_len: int,
) -> tuple[list[int], list[int]]:
    """BERT input of one sentence or a pair: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`.

    Truncation is HF's (tokenizers') 'longest_first': if only the longer side must shrink, it
    keeps what the shorter one leaves; if both must, the budget is halved, the odd token going
    to the longer side (to b when both are equally long). Nothing is padded.

    Args:
        vocabulary: a WordPiece vocabulary.
        text_a: the first sentence.
        text_b: the second sentence, or None for single-sentence tasks.
        max_len: length of the result at most, specials included (>= 3, or >= 2 without b).

    Returns:
        (input ids, token type ids): type 0 over [CLS] a [SEP], 1 over b [SEP].
    """
    specials = vocabulary.special_ids
    budget = max_len - (3 if text_b is not None else 2)
    if budget < 0:
        raise ValueError(f"max_len {max_len} leaves no room for the special tokens; use >= "
                         f"{3 if text_b is not None else 2}.")
    a = list(vocabulary.encode(text_a))
    b = list(vocabulary.encode(text_b)) if text_b is not None else []
    if text_b is None:
        a = a[:budget]
    else:
        a, b = truncate_pair(a, b, budget)
    ids = [specials.cls_id, *a, specials.sep_id]
    types = [0] * len(ids)
    if text_b is not None:
        ids += [*b, specials.sep_id]
        types += [1] * (len(b) + 1)
    return ids, types
