"""eval.py's work: fine-tune every (task, seed) through the train loop, score, tabulate.

Each run lives in OUT/<task>/seed<k> (a normal train-loop workdir plus `dev/step_N.json`, the
dev scores of every evaluation, and `result.json` once finished). Rerunning the same command
resumes an interrupted run from its last checkpoint and reuses finished ones; a run directory
holding different settings is refused rather than mixed. OUT/results.json, OUT/results.md and
OUT/tb (TensorBoard) hold the summary: mean ± std over seeds, and the benchmark score.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bigs_jax import fs
from bigs_jax.data import vocab as vocab_lib
from bigs_jax.errors import ConfigError
from bigs_jax.evals import glue, scrolls
from bigs_jax.models import build
from bigs_jax.train import checkpointing, loop
from bigs_jax.train import config as schema
from bigs_jax.train import metrics as tb
from bigs_jax.train.workdir import config_changes, eval_output

RESULT_JSON = "result.json"
MNLI_STARTED = ("mrpc", "stsb", "rte")


BENCHMARKS = {"glue": glue, "scrolls": scrolls}


def _benchmark(c: ConfigDict):
    if c.benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown config.benchmark {c.benchmark!r}; choose one of "
                          f"{sorted(BENCHMARKS)}")
    return BENCHMARKS[c.benchmark]


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ConfigError(f"config.{what} is empty; pass e.g. --config.{what}=a,b")
    return items


def recipe(c: ConfigDict, task: str) -> dict:
    """The task's recipe values: config.per_task.<task> over the global ones."""
    out = {k: c[k] for k in ("lr", "epochs", "max_steps", "batch_size", "max_len")}
    for key, value in (c.per_task.get(task) or {}).items():
        if value is not None:
            out[key] = value
    return out


def run_config(c: ConfigDict, task: str, seed: int, init: str, run_dir: str,
               bench) -> ConfigDict:
    """The train-loop config of one (task, seed) run."""
    r = recipe(c, task)
    workdir = checkpointing.resolve(init)[0]
    family = fs.read_json(fs.join(workdir, checkpointing.MODEL_JSON))["family"]
    # Models with learned positions cannot read past their max_len: dev rows are cut there.
    limit = getattr(checkpointing.read_model_config(workdir), "max_len", None) or math.inf
    if r["max_len"] > limit:
        raise ConfigError(f"max_len {r['max_len']} for {task} exceeds the max_len {limit} of "
                          f"config.init {init}; pass --config.max_len (or "
                          f"--config.per_task.{task}.max_len) <= {limit}")
    model = ConfigDict({"name": family, **bench.model_options(task),
                        **{k: v for k, v in c.model.items() if v is not None}})
    data = ConfigDict({
        "source": c.benchmark, "task": task, "format": c.format, "data_dir": c.data_dir,
        "tfds_data_dir": c.tfds_data_dir, "vocab_file": c.vocab_file or _vocab_of(c.init),
        "lower_case": c.lower_case, "seq_len": r["max_len"],
        "eval_seq_len": min(max(c.eval_max_len, r["max_len"]), limit),
        "batch_size": r["batch_size"],
        "eval_batch_size": c.eval_batch_size, "seed": seed, "scores_dir": run_dir,
        "max_train_examples": c.max_train_examples, "max_eval_examples": c.max_eval_examples,
        "eval_split": "validation", "eval_batches": c.eval_loss_batches,
        **bench.data_options(c),
    })
    rc = schema.run_config(model=model, data=data, objective=bench.objective(task), init=init)
    n = bench.train_size(rc)
    steps = max(1, math.ceil(r["epochs"] * n / r["batch_size"]))
    if r["max_steps"]:
        steps = min(steps, r["max_steps"])
    every = max(1, math.ceil(steps / max(1, c.evals)))
    # The fine-tuning recipe over the schema's defaults (BERT's: linear decay to 0, β2 0.999).
    rc.optim.update(lr=r["lr"], warmup_steps=round(c.warmup_ratio * steps), schedule="linear",
                    end_lr_ratio=0.0, b2=0.999, weight_decay=c.weight_decay)
    rc.train.update(steps=steps, log_every=min(10, every), eval_every=every,
                    checkpoint_every=every, keep_checkpoints=1, seed=seed,
                    eval_at_start=c.eval_at_start)
    rc.mesh = ConfigDict(c.mesh.to_dict())
    return rc


def _vocab_of(init: str) -> str:
    """The vocabulary file the init workdir records (tokenizer/vocab.txt or spm.model), so
    every run, and runs started from a fine-tuned model, read the same ids."""
    if not init:
        return ""
    return vocab_lib.workdir_vocabulary_file(checkpointing.resolve(init)[0]) or ""


def check_run_dir(run_dir: str, rc: ConfigDict) -> None:
    """Refuse a run directory that holds a run with other settings (resuming it, or reusing
    its result, would mix two configurations under one row). Keys its config.json lacks
    (added to the schema since) and where its scores go are not differences."""
    diff = sorted(config_changes(run_dir, rc))
    if diff:
        raise ConfigError(f"{run_dir} holds a run with other settings (differs in {diff}); "
                          "use a new --workdir or delete that directory")


def transfer_init(mnli_dir: str, dst: str, num_labels: int, seed: int) -> str:
    """A workdir holding the MNLI fine-tuned model with a fresh `num_labels` classifier.

    MRPC and STS-B have other label counts than MNLI; every parameter but the classifier's
    (whose shape differs) is the MNLI model's, as HF's `ignore_mismatched_sizes` does.
    """
    if fs.isdir(fs.join(dst, checkpointing.CHECKPOINTS)):
        return dst
    workdir, step = checkpointing.resolve(mnli_dir)
    config = checkpointing.read_model_config(workdir)
    target = dataclasses.replace(config, num_labels=num_labels)
    fresh = nnx.to_pure_dict(nnx.state(build(target, seed=seed)))
    mnli = nnx.to_pure_dict(nnx.state(checkpointing.load_model(workdir, step=step)))
    flat = dict(jax.tree_util.tree_leaves_with_path(mnli))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: flat[p] if p in flat and flat[p].shape == x.shape else x, fresh)
    tmp = f"{dst}.tmp"
    fs.rmtree(tmp)
    fs.makedirs(tmp)
    checkpointing.save_params_only(tmp, 0, params, {"from": workdir, "step": step})
    checkpointing.write_json_atomic(fs.join(tmp, checkpointing.MODEL_JSON),
                                    checkpointing.model_json(target))
    fs.rename(tmp, dst)
    return dst


def run_one(c: ConfigDict, bench, task: str, seed: int, out: str) -> Optional[dict]:
    """Fine-tune and score one (task, seed); None if the run was preempted."""
    run_dir = fs.join(out, task, f"seed{seed}")
    init = c.init
    if c.from_mnli and task in MNLI_STARTED and c.benchmark == "glue":
        mnli = c.mnli_init or fs.join(out, "mnli", f"seed{seed}")
        if not c.mnli_init and not fs.exists(fs.join(mnli, RESULT_JSON)):
            if run_one(c, bench, "mnli", seed, out) is None:
                return None
        # The run directory is ours before its init/ lands in it (train loop's workdir check).
        fs.makedirs(run_dir)
        if fs.is_primary():
            checkpointing.write_marker(run_dir)
        init = transfer_init(mnli, fs.join(run_dir, "init"),
                             bench.get_task(task).num_labels, seed)
    rc = run_config(c, task, seed, init, run_dir, bench)
    if hasattr(bench, "check_model"):
        bench.check_model(task, checkpointing.read_model_config(checkpointing.resolve(init)[0]))
    result_path = fs.join(run_dir, RESULT_JSON)
    check_run_dir(run_dir, rc)
    if fs.exists(result_path):
        result = fs.read_json(result_path)
        print(f"{task} seed {seed}: reusing {result_path}", flush=True)
        return result
    t0 = time.perf_counter()
    summary = loop.train_and_evaluate(rc, run_dir)
    if summary.get("preempted"):
        return None
    result = bench.finish(rc, run_dir, c.select)
    result.update({"task": task, "seed": seed, "steps": rc.train.steps,
                   "train_examples": bench.train_size(rc),
                   "seconds": round(time.perf_counter() - t0, 1),
                   "train_seconds": summary["elapsed_sec"]})
    if fs.is_primary():
        checkpointing.write_json_atomic(result_path, result)
    return result


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "values": [float(x) for x in v]}


def aggregate(results: dict[str, list[dict]], bench) -> dict:
    """results.json: per task and column, each metric's mean ± std over seeds; the score."""
    tasks = {}
    for task, runs in results.items():
        columns = {}
        for column in runs[0]["scores"]:
            columns[column] = {m: _mean_std([r["scores"][column][m] for r in runs])
                               for m in runs[0]["scores"][column]}
        tasks[task] = {"seeds": [r["seed"] for r in runs], "columns": columns,
                       "steps": [r["step"] for r in runs],
                       "seconds": [r["seconds"] for r in runs]}
    return {"benchmark": bench.NAME, "tasks": tasks, **bench.overall(tasks)}


def write_results(out: str, summary: dict, bench) -> None:
    checkpointing.write_json_atomic(fs.join(out, "results.json"), _json_safe(summary))
    fs.write_text(fs.join(out, "results.md"), bench.markdown(summary))
    writer = tb.writer(fs.join(out, "tb"))
    scalars = {f"{bench.NAME}/{col}/{m}": v["mean"]
               for t in summary["tasks"].values() for col, ms in t["columns"].items()
               for m, v in ms.items() if not math.isnan(v["mean"])}
    if summary.get("score") is not None and not math.isnan(summary["score"]):
        scalars[f"{bench.NAME}/score"] = summary["score"]
    writer.write_scalars(0, scalars)
    writer.flush()


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def evaluate(c: ConfigDict, out: str) -> Optional[dict]:
    """Run every task and seed of `c`; returns the summary (None if preempted)."""
    bench = _benchmark(c)
    if not c.init:
        raise ConfigError("config.init is empty; pass --config.init=WORKDIR (a pretrained "
                          "workdir or a converted checkpoint)")
    checkpointing.resolve(c.init)
    tasks = [bench.get_task(t).name for t in parse_list(c.tasks, "tasks")]
    try:
        seeds = [int(s) for s in parse_list(c.seeds, "seeds")]
    except ValueError:
        raise ConfigError(f"config.seeds {c.seeds!r} is not a list of integers; pass e.g. "
                          "--config.seeds=0,1,2") from None
    if c.select not in ("best", "last"):
        raise ConfigError(f"unknown config.select {c.select!r}; choose best or last")
    results = {}
    with eval_output(out) as out:
        for task in tasks:
            runs = []
            for seed in seeds:
                result = run_one(c, bench, task, seed, out)
                if result is None:
                    print("stopped (preempted); rerun the same command to resume", flush=True)
                    return None
                runs.append(result)
            results[task] = runs
    summary = aggregate(results, bench)
    if fs.is_primary():
        write_results(out, summary, bench)
    print(bench.markdown(summary), flush=True)
    return summary
