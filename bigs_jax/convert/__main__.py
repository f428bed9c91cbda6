"""Command line: convert checkpoints between foreign formats and bigs_jax workdirs.

    python -m bigs_jax.convert SRC DST
        [--from auto|hf|hf-bert|hf-gpt2|hf-vit|bigs-official|m2-official]
        [--to bigs|hf|bigs-official|m2-official] [--official-padding]
        [--vocab-multiple N]

Import (`--to bigs`, the default) turns an HF BERT / GPT-2 / ViT directory or an official BiGS
or M2-BERT checkpoint into a new workdir that `bigs_jax.load(DST)` reads; export turns a
bigs_jax workdir into an HF directory `transformers` loads (`--to hf`: BERT, GPT-2, ViT) or
into the official BiGS / M2-BERT layout (`--to bigs-official`, `--to m2-official`). DST must
not exist; a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bigs_jax.convert.common import FROM_CHOICES, TO_CHOICES, ConversionError, convert
from bigs_jax.errors import CheckpointWriteError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bigs_jax.convert",
        description="Convert a checkpoint directory into a new bigs_jax workdir (--to bigs) or "
                    "a bigs_jax workdir into a foreign format (--to hf|bigs-official|"
                    "m2-official).")
    parser.add_argument("src", help="checkpoint directory or bigs_jax workdir")
    parser.add_argument("dst", help="directory to create (must not exist)")
    parser.add_argument("--from", dest="from_", default="auto", choices=FROM_CHOICES,
                        help="source format (default: detect; 'hf' reads config.json "
                             "model_type)")
    # Checked by convert(), so a wrong value is one line naming the supported pairs.
    parser.add_argument("--to", default="bigs", metavar="{" + "|".join(TO_CHOICES) + "}",
                        help="bigs: a workdir (default); hf: an HF directory; bigs-official, "
                             "m2-official: the official checkpoint layouts")
    parser.add_argument("--official-padding", action="store_true",
                        help="bigs-official and m2-official: let pads reach the mixers as the "
                             "official code does (exact parity on padded batches); default is "
                             "padding-correct")
    parser.add_argument("--vocab-multiple", type=int, default=1,
                        help="importing: pad the vocabulary (embedding rows, MLM bias, LM "
                             "head) to a multiple of N, e.g. 128 for tensor parallelism; pad "
                             "logits are masked and an export drops the rows again")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.dst, from_=args.from_, to=args.to,
                      official_padding=args.official_padding,
                      vocab_multiple=args.vocab_multiple), flush=True)
    except (ConversionError, CheckpointWriteError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
