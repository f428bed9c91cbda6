"""GLUE fine-tuning and scoring of a pretrained encoder (BERT, BiGS and ablations, M2-BERT).

    python eval.py --config=configs/glue.py --config.init=WORKDIR --workdir=OUT \
        [--config.tasks=sst2,stsb] [--config.data_dir=/path/to/glue_data] [--config.seeds=0,1,2]
    python eval.py --config=configs/glue.py:recipe=bigs --config.init=WORKDIR --workdir=OUT

WORKDIR is a train.py workdir or a converted checkpoint (`python -m bigs_jax.convert`); either
records its vocabulary in `tokenizer/` (vocab.txt or spm.model), which is read unless
`--config.vocab_file` names another. Each task and seed fine-tunes in OUT/<task>/seed<k> through
the train loop (resumable: rerun the same command; a finished task is reused), then
OUT/results.json and OUT/results.md hold the dev scores (mean ± std over seeds) and the GLUE
score.

Recipes:
- default ("cpu"): sized for a laptop CPU with a small model (the converted all-MiniLM-L6-v2
  reaches SST-2 ≥ 85 acc, STS-B ≥ 80 Pearson, RTE ≥ 55 acc, CoLA ≥ 20 MCC, each in under 20
  minutes on 2 cores): AdamW lr 1e-4 (CoLA 3e-5), batch 16, warmup 10%, linear decay to 0,
  3 epochs capped at `max_steps` (400; per task below), train rows truncated to `max_len`
  (short for the one-sentence tasks; dev rows are never truncated below `eval_max_len`), the
  best of 3 dev evaluations reported, the eval loss on one dev batch (metrics on all of dev).
- `recipe=bigs`: the BiGS paper's GLUE recipe (research/bigs.md §1.7): lr 2e-5, 3 epochs,
  batch 16, max length 512, warmup 10% then linear decay, AdamW β=(0.9, 0.999), eps 1e-6,
  weight decay 0.01, best dev score over periodic evaluations, MRPC/STS-B/RTE started from the
  MNLI fine-tuned model.
- `smoke`: a few steps on a few rows (CI).

Per-task overrides: `--config.per_task.rte.lr=3e-5` (keys lr, epochs, max_steps, batch_size,
max_len); `--config.select=last` reports the final step instead of the best evaluation.
"""

from ml_collections import ConfigDict, config_dict

from bigs_jax.train.config import add_finetune_sections, parse_arg

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# CPU recipe: train lengths cover ≥ 99% of CoLA / SST-2 / STS-B train rows (WordPiece, the
# bert-base-uncased vocabulary); step caps keep each task within ~20 minutes of a 2-core CPU
# with a 6-layer, 384-wide model. CoLA at lr 1e-4 (or 400 steps) predicts the majority class
# (MCC 0); at 3e-5 its MCC rises steadily with steps.
CPU_TASK = {
    "cola": dict(max_len=32, max_steps=1000, lr=3e-5),
    "sst2": dict(max_len=32, max_steps=500),
    "stsb": dict(max_len=64, max_steps=250),
    "rte": dict(max_len=128, max_steps=160),
}


def get_config(arg=None):
    args = parse_arg(arg, ("recipe", "smoke"))
    recipe = args.get("recipe", "cpu")
    if recipe not in ("cpu", "bigs"):
        raise ValueError(f"unknown recipe {recipe!r}; choose cpu or bigs")
    c = ConfigDict()
    c.benchmark = "glue"
    c.init = ""                      # the pretrained workdir / converted checkpoint (required)
    c.tasks = ",".join(TASKS)
    c.seeds = "0"                    # comma-separated; results report mean ± std over them
    # Data: official TSVs under data_dir/<TASK>/ (format=tsv) or tfds glue/* (format=tfds).
    c.format = "tsv"
    c.data_dir = "../shared/data/glue"
    c.tfds_data_dir = ""
    c.vocab_file = ""                # default: <init>/tokenizer/ (vocab.txt or spm.model)
    c.lower_case = config_dict.placeholder(bool)  # default: the tokenizer's do_lower_case
    # Recipe.
    c.lr = 1e-4
    c.epochs = 3.0
    c.max_steps = 0                  # cap on steps per task (0: none)
    c.batch_size = 32
    c.eval_batch_size = 64
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.max_len = 128                  # train rows are truncated to this many tokens
    c.eval_max_len = 512             # dev rows: no truncation up to this length
    c.evals = 4                      # dev evaluations per run
    c.eval_at_start = True           # also evaluate before training (step 0)
    c.eval_loss_batches = 0          # eval loss on the first N dev batches (0: all); the task
                                     # metrics always cover the whole dev set
    c.select = "best"                # best | last
    c.from_mnli = False              # start MRPC, STS-B, RTE from the MNLI fine-tuned model
    c.mnli_init = ""                 # that model (default: OUT/mnli/seed<k>, run first)
    c.max_train_examples = 0         # test/smoke only: use the first N rows
    c.max_eval_examples = 0
    # Model options over the checkpoint's (None: keep the checkpoint's value).
    add_finetune_sections(c, TASKS, {"pooler": str, "classifier_dropout": float,
                                     "dropout": float, "attention_dropout": float})
    if recipe == "cpu":
        c.max_steps = 400            # QQP / MNLI / QNLI: a fraction of an epoch on a CPU
        c.batch_size = 16
        c.evals = 3
        c.eval_at_start = False
        c.eval_loss_batches = 1
        for task, values in CPU_TASK.items():
            for key, value in values.items():
                c.per_task[task][key] = value
    else:
        c.lr = 2e-5
        c.batch_size = 16
        c.max_len = 512
        c.from_mnli = True
    if args.get("smoke"):
        c.max_steps = 4
        c.evals = 2
        c.batch_size = 8
        c.eval_batch_size = 8
        c.max_train_examples = 64
        c.max_eval_examples = 16
        for task in TASKS:
            c.per_task[task].max_steps = None
            c.per_task[task].max_len = None
    return c
