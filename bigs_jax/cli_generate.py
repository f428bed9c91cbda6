"""`python -m bigs_jax.generate WORKDIR --prompt "..."`: continue a prompt with a workdir's model.

    python -m bigs_jax.generate workdirs/gpt2 --prompt "The meaning of life is" \
        --max_new_tokens 40 --temperature 0.8 --top_p 0.9 --seed 1
    python -m bigs_jax.generate workdirs/gpt2 --prompt "Once upon a time" --num_beams 4

The model is `bigs_jax.load(WORKDIR)` (a train.py or convert workdir, or one checkpoint step
dir); the text is tokenized with the workdir's own vocabulary (`tokenizer/` of a converted
checkpoint: GPT-2 vocab.json + merges.txt, a SentencePiece model; else the embedded
vocabulary for models of its size) or `--vocab PATH`. Greedy unless --temperature, --top_k
or --top_p ask for sampling; --num_beams > 1 is beam search. Prints the prompt and its
continuation. Expected mistakes (a missing workdir, an encoder that cannot generate, a
vocabulary that does not fit the model) end with one `error:` line.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from bigs_jax import fs  # noqa: E402
from bigs_jax.data import tasks  # noqa: E402
from bigs_jax.data import vocab as vocab_lib  # noqa: E402
from bigs_jax.generation import can_generate, generate  # noqa: E402
from bigs_jax.train import checkpointing  # noqa: E402

TOKENIZER_DIR = "tokenizer"


def workdir_vocabulary(workdir: str, vocab_size: int, path: str = ""):
    """(SeqIO vocabulary, end-of-text id) of a workdir's model: `path`, else the workdir's
    tokenizer/ files, else the embedded vocabulary when the model has its size."""
    if not path:
        tok = fs.join(checkpointing.resolve(workdir)[0], TOKENIZER_DIR)
        for name in ("vocab.json", "spm.model", "tokenizer.model", "vocab.txt"):
            if fs.isfile(fs.join(tok, name)):
                path = fs.join(tok, name)
                break
    if path:
        vocabulary = tasks.load_vocabulary(path)
    elif vocab_size == vocab_lib.EMBEDDED_VOCAB_SIZE:
        vocabulary = vocab_lib.embedded_vocabulary()
    else:
        raise ValueError(f"{workdir} has no tokenizer/ and its model's vocab_size {vocab_size} "
                         "is not the embedded vocabulary's; pass --vocab (vocab.json, .model)")
    if vocabulary.vocab_size > vocab_size:
        raise ValueError(f"the vocabulary has {vocabulary.vocab_size} ids but the model only "
                         f"{vocab_size}; pass the model's own vocabulary with --vocab")
    return vocabulary, vocab_lib.end_of_text_id(vocabulary)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bigs_jax.generate",
                                description="Continue a prompt with a workdir's causal LM.")
    p.add_argument("workdir", help="a train.py / convert workdir (or a checkpoint step dir)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (default: greedy)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--num_beams", type=int, default=1, help="> 1: beam search")
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--vocab", default="", help="vocabulary file (default: the workdir's)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p.parse_args(argv)


def run(args) -> str:
    model = checkpointing.load_model(args.workdir, step=args.step)
    if not can_generate(model):
        raise ValueError(f"the model in {args.workdir} ({type(model).__name__}) is not a "
                         "causal LM and cannot generate; use a GPT-2, M2-GPT or bigs-lm workdir")
    vocabulary, eos = workdir_vocabulary(args.workdir, model.config.vocab_size, args.vocab)
    ids = list(vocabulary.encode(args.prompt))
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass some text")
    sample = args.temperature is not None or args.top_k > 0 or args.top_p < 1
    out = generate(model, [ids], max_new_tokens=args.max_new_tokens, eos_id=eos,
                   do_sample=sample, top_k=args.top_k,
                   temperature=1.0 if args.temperature is None else args.temperature,
                   top_p=args.top_p, key=jax.random.key(args.seed), num_beams=args.num_beams,
                   length_penalty=args.length_penalty, return_dict=True)
    return args.prompt + vocabulary.decode(out.tolist(eos_id=eos)[0])


def main(argv=None) -> int:
    args = parse(argv)
    try:
        print(run(args), flush=True)
    except (ValueError, FileNotFoundError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0
