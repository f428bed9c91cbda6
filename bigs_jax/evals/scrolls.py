"""SCROLLS (Shaham et al. 2022, https://www.scrolls-benchmark.com) fine-tuning and scoring.

Seven tasks. Rows are the official files' (`<data_dir>/<task>/{train,validation}.jsonl`, one
JSON object per line with id, pid, input, output) or the tfds `scrolls/<task>` builder's;
several rows with one id are one example with several references. Query-based tasks carry the
query before the document, separated by a blank line (research/frameworks.md §4.2).

- ContractNLI and QuALITY are classification-style and run with encoder heads:
  `[CLS] query [SEP] document [SEP]` with the document truncated; ContractNLI's three labels
  are classes, QuALITY is a 4-way choice among the (A)-(D) options listed in its query, the
  prediction being the chosen option's text. Dev exact match is scored at every evaluation.
- GovReport, SummScreenFD, QMSum, Qasper and NarrativeQA are generation tasks for causal
  models (GPT-2, M2-GPT, causal gated SSM): trained on `prompt [SEP] output [SEP]` with the loss
  on the output, then decoded from `prompt [SEP]` until [SEP] (or a BPE vocabulary's
  <|endoftext|>) by the cached `bigs_jax.generate`: greedy, or beam search with
  `num_beams` > 1 and `length_penalty` (configs/scrolls.py). `greedy_decode`, which
  recomputes the prefix at every step, stays as the reference and benchmark baseline.

Predictions land in `<run>/predictions.json` in the official submission format
({id: prediction}); scores follow the official metrics (`evals.metrics`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bigs_jax import fs, generation
from bigs_jax.data import registry
from bigs_jax.data import vocab as vocab_lib
from bigs_jax.evals import finetune, metrics
from bigs_jax.evals.finetune import DataError
from bigs_jax.train import checkpointing
from bigs_jax.train.metrics import read_scores

NAME = "scrolls"
TASKS = ("gov_report", "summ_screen_fd", "qmsum", "qasper", "narrative_qa", "quality",
         "contract_nli")
CONTRACT_NLI_LABELS = ("Not mentioned", "Entailment", "Contradiction")
QUERY_TASKS = ("qmsum", "qasper", "narrative_qa", "quality", "contract_nli")
CLASSIFICATION = ("quality", "contract_nli")
_OPTION = re.compile(r"^\(([A-D])\) ?(.*)$", re.M)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str

    @property
    def generation(self) -> bool:
        return self.name not in CLASSIFICATION

    @property
    def num_labels(self) -> int:
        return {"quality": 4, "contract_nli": 3}.get(self.name, 0)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown SCROLLS task {name!r}; choose from {', '.join(TASKS)}")
    return Task(name)


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Example:
    id: str
    input: str
    outputs: list[str]


def read_jsonl(path: str, task: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"SCROLLS {task}: {path} not found; put the official files there "
                        f"({task}/train.jsonl and {task}/validation.jsonl from the released "
                        f"{task}.zip) and pass their parent as --config.data_dir, or use "
                        "--config.format=tfds with a tfds data_dir")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: row[k] for k in ("id", "input", "output")})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"SCROLLS {task}: {path} line {n} is not a JSON object with "
                                "id, input and output; pass the official file") from None
    return rows


def read_tfds(task: str, split: str, data_dir: str) -> list[dict]:
    # tfds takes seconds to import; only format=tfds reads it.
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    name = f"scrolls/{task}"
    try:
        ds = tfds.builder(name, data_dir=data_dir or None).as_dataset(split=split,
                                                                       shuffle_files=False)
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
        where = data_dir or "~/tensorflow_datasets"
        raise DataError(f"tfds dataset {name} (split {split}) is not prepared in {where} "
                        f"({type(e).__name__}); run tfds.builder('{name}', data_dir='{where}')"
                        ".download_and_prepare() or use --config.format=jsonl") from None
    return [{k: ex[k].decode("utf-8") for k in ("id", "input", "output")}
            for ex in tfds.as_numpy(ds)]


def read(config: ConfigDict, split: str) -> list[Example]:
    """Examples of a split; rows sharing an id become one example with several outputs."""
    d = config.data
    if d.format == "tfds":
        rows = read_tfds(d.task, split, d.get("tfds_data_dir") or "")
    elif d.format == "jsonl":
        rows = read_jsonl(os.path.join(d.data_dir, d.task, f"{split}.jsonl"), d.task)
    else:
        raise DataError(f"unknown config.format {d.format!r}; choose jsonl or tfds")
    grouped: dict[str, Example] = {}
    for row in rows:
        ex = grouped.setdefault(row["id"], Example(row["id"], row["input"], []))
        ex.outputs.append(row["output"])
    examples = list(grouped.values())
    limit = d.get("max_train_examples" if split == "train" else "max_eval_examples") or 0
    examples = examples[:limit] if limit else examples
    if not examples:
        raise DataError(f"SCROLLS {d.task} {split} holds no examples")
    return examples


def split_query(task: str, text: str) -> tuple[str, str]:
    """(query, document) of an input; the query is empty for the summarization tasks."""
    if task == "quality":
        options = list(_OPTION.finditer(text))
        if len(options) != 4:
            raise DataError(f"SCROLLS quality: an input lists {len(options)} options, expected "
                            "(A) to (D) before the article; pass the official file")
        end = options[-1].end()
        return text[:end].strip(), text[end:].strip()
    if task in QUERY_TASKS and "\n\n" in text:
        query, doc = text.split("\n\n", 1)
        return query.strip(), doc.strip()
    return "", text


def label_of(task: str, ex_input: str, output: str) -> int:
    """The class of an output (ContractNLI label, QuALITY option index); -1 if none fits."""
    if task == "contract_nli":
        names = CONTRACT_NLI_LABELS
    else:
        names = [m.group(2).strip() for m in _OPTION.finditer(split_query(task, ex_input)[0])]
    output = output.strip()
    return names.index(output) if output in names else -1


def class_names(task: str, ex_input: str) -> list[str]:
    if task == "contract_nli":
        return list(CONTRACT_NLI_LABELS)
    return [m.group(2).strip() for m in _OPTION.finditer(split_query(task, ex_input)[0])]


def train_size(config: ConfigDict) -> int:
    return sum(len(ex.outputs) for ex in read(config, "train"))


# ---------------------------------------------------------------------------- vocabulary


def vocabulary(config: ConfigDict):
    """WordPiece, SentencePiece or GPT-2 byte-level BPE vocabulary: config.data.vocab_file, the
    one the init workdir records in tokenizer/, or (causal models without one) the embedded
    vocabulary."""
    if config.data.get("vocab_file"):
        return finetune.vocabulary(config)
    if config.get("init"):
        workdir = checkpointing.resolve(config.init)[0]
        if vocab_lib.workdir_vocabulary_file(workdir):
            return finetune.vocabulary(config)
    return vocab_lib.embedded_vocabulary()


# ---------------------------------------------------------------------------- classification


def _classification_source(config: ConfigDict, vocab) -> finetune.ExampleSource:
    d, task = config.data, config.data.task
    rows = [(ex, out) for ex in read(config, "train") for out in ex.outputs]
    labels = np.asarray([label_of(task, ex.input, out) for ex, out in rows], np.int32)
    bad = int((labels < 0).sum())
    if bad:
        print(f"SCROLLS {task}: skipped {bad} train rows whose output is not a class", flush=True)
    rows = [r for r, y in zip(rows, labels) if y >= 0]
    labels = labels[labels >= 0]
    ids, types = _encode(vocab, task, [ex.input for ex, _ in rows], d.seq_len)
    train = finetune.Examples.build(ids, types, labels, d.seq_len)
    dev_examples = read(config, "validation")
    dev_len = d.get("eval_seq_len") or d.seq_len
    ids, types = _encode(vocab, task, [ex.input for ex in dev_examples], dev_len)
    dev_labels = [max(label_of(task, ex.input, ex.outputs[0]), 0) for ex in dev_examples]
    dev = finetune.Examples.build(ids, types, dev_labels, finetune.eval_length(ids, dev_len))

    def score(logits: dict[str, np.ndarray]):
        choice = logits[task].argmax(-1)
        preds = [class_names(task, ex.input)[c] for ex, c in zip(dev_examples, choice)]
        scores = metrics.scrolls_metrics(task, preds, [ex.outputs for ex in dev_examples])
        return ({task: {"exact_match": scores["exact_match"]}},
                {ex.id: p for ex, p in zip(dev_examples, preds)})

    return finetune.ExampleSource(
        config=config, train=train, dev=dev, columns={task: (0, len(dev_examples))},
        overrides={"vocab_size": vocab.vocab_size, "num_labels": get_task(task).num_labels},
        score_fn=score, vocab=vocab)


def _encode(vocab, task: str, inputs: list[str], max_len: int):
    pairs = [split_query(task, x) for x in inputs]
    return finetune.encode_examples(vocab, [q for q, _ in pairs], [doc for _, doc in pairs],
                                    max_len)


# ---------------------------------------------------------------------------- generation


def _specials(vocab):
    return vocab_lib.special_ids(vocab)


def prompt_ids(vocab, inputs: list[str], budget: int) -> list[list[int]]:
    """`input [SEP]` token ids, the input cut to `budget - 1` tokens (the query comes first
    and is kept; the document's end is dropped)."""
    sep = _specials(vocab).sep_id
    return [ids[:budget - 1] + [sep] for ids in finetune.encode_texts(vocab, inputs)]


def lm_rows(vocab, inputs, outputs, seq_len: int, max_target_len: int) -> dict[str, np.ndarray]:
    """Causal-LM rows `prompt [SEP] output [SEP]` (loss on `output [SEP]`), right-padded."""
    sep = _specials(vocab).sep_id
    prompts = prompt_ids(vocab, inputs, seq_len + 1 - max_target_len - 1)
    targets = [t[:max_target_len] + [sep] for t in finetune.encode_texts(vocab, outputs)]
    n = len(prompts)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("input_ids", "attention_mask",
                                                          "labels")}
    out["loss_weights"] = np.zeros((n, seq_len), np.float32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        seq = (p + t)[:seq_len + 1]
        k = len(seq) - 1
        out["input_ids"][i, :k] = seq[:-1]
        out["labels"][i, :k] = seq[1:]
        out["attention_mask"][i, :k] = 1
        out["loss_weights"][i, len(p) - 1:k] = 1.0
    return out


@dataclasses.dataclass
class LMSource:
    """Causal-LM fine-tuning rows of a generation task (no per-step scoring: decoding is slow,
    so the dev set is decoded once, by `finish`)."""

    config: ConfigDict
    train: dict
    dev: dict
    vocab_size: int

    def model_overrides(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def iterators(self, start_step: int):
        d = self.config.data
        n = len(self.train["input_ids"])

        def train():
            step = start_step
            while True:
                idx = finetune.train_index(step, n, d.batch_size, d.seed)
                yield finetune.host_slice({k: v[idx] for k, v in self.train.items()},
                                          d.batch_size)
                step += 1

        evals = []
        m, b = len(self.dev["input_ids"]), d.eval_batch_size
        for i in range(0, -(-m // b) * b, b):
            idx = np.minimum(np.arange(i, i + b), m - 1)
            batch = {k: v[idx] for k, v in self.dev.items()}
            batch["loss_weights"] = batch["loss_weights"] * (np.arange(i, i + b) < m)[:, None]
            evals.append(finetune.host_slice(batch, b))
        return train(), evals


def _lm_source(config: ConfigDict, vocab) -> LMSource:
    d = config.data
    rows = [(ex.input, out) for ex in read(config, "train") for out in ex.outputs]
    dev = [(ex.input, ex.outputs[0]) for ex in read(config, "validation")]
    mk = functools.partial(lm_rows, vocab, seq_len=d.seq_len, max_target_len=d.max_target_len)
    return LMSource(config, mk([x for x, _ in rows], [y for _, y in rows]),
                    mk([x for x, _ in dev], [y for _, y in dev]), vocab.vocab_size)


def greedy_decode(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
                  seq_len: int, batch_size: int) -> list[list[int]]:
    """Reference (and benchmark baseline) for `decode`: greedy continuation of each prompt until `eos_id` or `max_new_tokens`, at one fixed
    shape (B, seq_len) so the forward compiles once; the prefix is recomputed every step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_tokens(state, ids_BL, mask_BL, last_B):
        logits = nnx.merge(graphdef, state)(ids_BL, attention_mask=mask_BL,
                                            deterministic=True).logits
        return jax.numpy.argmax(logits[jax.numpy.arange(ids_BL.shape[0]), last_B], -1)

    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - rows)
        ids = np.zeros((batch_size, seq_len), np.int32)
        lens = np.array([min(len(p), seq_len) for p in chunk])
        for r, p in enumerate(chunk):
            ids[r, :lens[r]] = p[:seq_len]
        done = np.zeros(batch_size, bool)
        gen = [[] for _ in range(batch_size)]
        for _ in range(max_new_tokens):
            if done.all() or lens.max() >= seq_len:
                break
            mask = (np.arange(seq_len)[None] < lens[:, None]).astype(np.int32)
            tok = np.asarray(next_tokens(state, ids, mask, lens - 1))
            for r in np.flatnonzero(~done):
                if tok[r] == eos_id:
                    done[r] = True
                    continue
                gen[r].append(int(tok[r]))
                ids[r, lens[r]] = tok[r]
                lens[r] += 1
        out.extend(gen[:rows])
    return out


def decode(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
           batch_size: int, num_beams: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    """Each prompt's continuation until `eos_id` (dropped) or `max_new_tokens`, by the cached
    `bigs_jax.generate`: greedy (num_beams=1, the tokens of `greedy_decode`) or beam search."""
    out = []
    for i in range(0, len(prompts), batch_size):
        result = generation.generate(model, prompts[i:i + batch_size],
                                     max_new_tokens=max_new_tokens, eos_id=eos_id,
                                     num_beams=num_beams, length_penalty=length_penalty,
                                     return_dict=True)
        out.extend(result.tolist(eos_id=eos_id))
    return out


# ---------------------------------------------------------------------------- the source


def data_source(config: ConfigDict):
    task = get_task(config.data.task)
    vocab = vocabulary(config)
    return _lm_source(config, vocab) if task.generation else _classification_source(config,
                                                                                    vocab)


# ---------------------------------------------------------------------------- eval.py

HEADERS = {"gov_report": "GovRep (R1/R2/RL)", "summ_screen_fd": "SumScr (R1/R2/RL)",
           "qmsum": "QMSum (R1/R2/RL)", "qasper": "Qasper (F1)", "narrative_qa": "NrtvQA (F1)",
           "quality": "QuALITY (EM)", "contract_nli": "CNLI (EM)"}


def objective(task: str) -> str:
    return "lm" if get_task(task).generation else "classification"


def model_options(task: str) -> dict:
    return {} if get_task(task).generation else {"head": "classification"}


def data_options(c: ConfigDict) -> dict:
    return {"max_target_len": c.max_target_len, "num_beams": c.get("num_beams", 1),
            "length_penalty": c.get("length_penalty", 1.0)}


def check_model(task: str, model_config) -> None:
    causal = bool(getattr(model_config, "causal", False)) or hasattr(model_config,
                                                                      "tie_word_embeddings")
    if get_task(task).generation and not causal:
        raise DataError(f"SCROLLS {task} is a generation task: pass a causal model (gpt2, "
                        "m2-gpt, causal gated SSM) as config.init")
    if not get_task(task).generation and causal:
        raise DataError(f"SCROLLS {task} is scored with an encoder head: pass an encoder "
                        "(BERT, BiGS, M2-BERT) as config.init")


def finish(rc: ConfigDict, run_dir: str, how: str) -> dict:
    """Scores and official-format predictions (`predictions.json`) of a finished run."""
    task = get_task(rc.data.task)
    if task.generation:
        # Only the last checkpoint is kept and decoding the dev set is the expensive part.
        vocab = vocabulary(rc)
        examples = read(rc, "validation")
        model = checkpointing.load_model(run_dir)
        d = rc.data
        # The prompts of training: room is left for max_target_len tokens and [SEP].
        prompts = prompt_ids(vocab, [ex.input for ex in examples], d.seq_len - d.max_target_len)
        tokens = decode(model, prompts, max_new_tokens=d.max_target_len,
                        eos_id=vocab_lib.end_of_text_id(vocab), batch_size=d.eval_batch_size,
                        num_beams=d.get("num_beams") or 1,
                        length_penalty=d.get("length_penalty", 1.0))
        texts = [vocab.decode(t) for t in tokens]
        predictions = {ex.id: p for ex, p in zip(examples, texts)}
        scores = {task.name: {k: v for k, v in metrics.scrolls_metrics(
            task.name, texts, [ex.outputs for ex in examples]).items() if k != "score"}}
        step, how = rc.train.steps, "last"
    else:
        step, entry = finetune.select(read_scores(run_dir), how)
        scores, predictions = entry["scores"], entry["predictions"]
    if fs.is_primary():
        checkpointing.write_json_atomic(fs.join(run_dir, "predictions.json"), predictions)
    return {"step": step, "select": how, "scores": scores}


def _task_score(task: str, ms: dict) -> float:
    if "geometric_mean" in ms:
        return ms["geometric_mean"]["mean"]
    return next(iter(ms.values()))["mean"]


def overall(tasks: dict) -> dict:
    scores = {t: _task_score(t, v["columns"][t]) for t, v in tasks.items()}
    return {"score": metrics.scrolls_score(scores), "score_tasks": sorted(scores)}


def markdown(summary: dict) -> str:
    order = [t for t in TASKS if t in summary["tasks"]]
    cells = []
    for t in order:
        ms = summary["tasks"][t]["columns"][t]
        keys = ["rouge1", "rouge2", "rougeL"] if "rouge1" in ms else list(ms)
        parts = []
        for k in keys:
            text = f"{ms[k]['mean']:.1f}"
            if len(ms[k]["values"]) > 1:
                text += f"±{ms[k]['std']:.1f}"
            parts.append(text)
        cells.append("/".join(parts))
    n = len(summary["score_tasks"])
    head = [HEADERS[t] for t in order] + ["SCROLLS" if n == 7 else f"SCROLLS ({n}/7 tasks)"]
    return "\n".join(["SCROLLS validation results", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head),
                      "| " + " | ".join(cells + [f"{summary['score']:.1f}"]) + " |", ""])


registry.register("scrolls", data_source)
