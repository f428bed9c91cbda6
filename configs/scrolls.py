"""SCROLLS fine-tuning and scoring: encoder heads for ContractNLI / QuALITY, causal models
(GPT-2, M2-GPT, causal gated SSM) with cached greedy or beam-search decoding
(`--config.num_beams=4`) for the five generation tasks.

    # classification-style tasks with an encoder (BiGS at 4096 tokens, as the paper):
    python eval.py --config=configs/scrolls.py --config.init=BIGS_WORKDIR --workdir=OUT \
        --config.tasks=contract_nli,quality --config.max_len=4096
    # generation tasks with a causal model:
    python eval.py --config=configs/scrolls.py --config.init=GPT2_WORKDIR --workdir=OUT \
        --config.tasks=gov_report,summ_screen_fd,qmsum,qasper,narrative_qa

Data: the official files `<data_dir>/<task>/{train,validation}.jsonl` (format=jsonl, from the
released zips) or the tfds `scrolls/<task>` builder (format=tfds, local tfds_data_dir). Scores
are on validation (test labels are hidden); OUT/<task>/seed<k>/predictions.json holds the
predictions in the official submission format ({id: prediction}). A model of the wrong kind
for a task (an encoder for a generation task) stops with one line.
`smoke` shrinks every run to a few steps on a few rows.
"""

from ml_collections import ConfigDict, config_dict

from bigs_jax.train.config import add_finetune_sections, parse_arg

TASKS = ("gov_report", "summ_screen_fd", "qmsum", "qasper", "narrative_qa", "quality",
         "contract_nli")


def get_config(arg=None):
    args = parse_arg(arg, ("smoke",))
    c = ConfigDict()
    c.benchmark = "scrolls"
    c.init = ""
    c.tasks = "contract_nli,quality"
    c.seeds = "0"
    c.format = "jsonl"
    c.data_dir = "scrolls"
    c.tfds_data_dir = ""
    c.vocab_file = ""                # default: <init>/tokenizer/ (vocab.txt or *.model)
    c.lower_case = config_dict.placeholder(bool)
    c.lr = 2e-5
    c.epochs = 3.0
    c.max_steps = 0
    c.batch_size = 16
    c.eval_batch_size = 16
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.max_len = 4096                 # model input length (prompt + output for generation)
    c.eval_max_len = 4096
    c.max_target_len = 512           # generation: output tokens trained on and decoded
    c.num_beams = 1                  # generation: 1 = greedy, > 1 = beam search
    c.length_penalty = 1.0           # beam search: score = log p / length ** length_penalty
    c.evals = 4
    c.eval_at_start = False
    c.eval_loss_batches = 0
    c.select = "best"                # classification tasks; generation scores the last step
    c.from_mnli = False
    c.mnli_init = ""
    c.max_train_examples = 0
    c.max_eval_examples = 0
    add_finetune_sections(c, TASKS, {"pooler": str, "classifier_dropout": float, "dropout": float})
    if args.get("smoke"):
        c.max_steps = 4
        c.evals = 2
        c.batch_size = 2
        c.eval_batch_size = 2
        c.max_len = 256
        c.eval_max_len = 256
        c.max_target_len = 16
        c.max_train_examples = 8
        c.max_eval_examples = 4
    return c
