"""eval.py's FPT protocol: an lr sweep × seeds × {frozen pretrained, frozen random, full}.

Rothermel et al. 2021 ("Don't Sweep your Learning Rate under the Rug", arXiv 2107.12460)
showed that FPT's conclusions hinge on the single fixed lr; this protocol picks the lr on a
validation split and reports the test score there:

- every (task, mode, lr, seed) trains through the train loop in OUT/<task>/<mode>/lr<lr>/
  seed<k> (resumable; finished runs are reused), scoring validation and test accuracy at each
  evaluation (`data.fpt_tasks.FPTSource.score`); a run's score is its last evaluation's;
- `protocol.sweep = "all"`: every lr runs with every seed and the lr with the best mean
  validation accuracy wins; `"first_seed"`: the lrs run with the first seed only, and the
  other seeds only at the lr that seed picked (cheaper; the selection then sees one seed);
- OUT/results.json and OUT/results.md: per task and mode, the chosen lr, test and validation
  accuracy mean ± std over seeds at it, each lr's mean validation accuracy, and the trainable
  parameter count with its fraction of all parameters.

Modes: `pretrained` (config.init's weights, frozen per config.fpt's switches), `random` (the
same architecture at random init, frozen alike), `full` (config.init's weights, all trained).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from ml_collections import ConfigDict

from bigs_jax import fpt, fs
from bigs_jax.data.fpt_tasks import apply_task_settings, check_data
from bigs_jax.evals.runner import check_run_dir
from bigs_jax.fpt import freeze_patterns
from bigs_jax.train import checkpointing, loop
from bigs_jax.train.metrics import read_scores
from bigs_jax.train.workdir import config_diff, eval_output
from bigs_jax.errors import ConfigError

MODES = ("pretrained", "random", "full")
MODE_TITLES = {"pretrained": "frozen pretrained", "random": "frozen random",
               "full": "full fine-tune"}
RESULT_JSON = "result.json"


def _list(text, what: str, cast=str) -> list:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        items = [cast(x) for x in items]
    except ValueError:
        raise ConfigError(f"config.protocol.{what} {text!r} is not a list of {cast.__name__}; "
                          f"pass e.g. --config.protocol.{what}=a,b") from None
    if not items:
        raise ConfigError(f"config.protocol.{what} is empty")
    return items


def run_config(c: ConfigDict, task: str, mode: str, lr: float, seed: int,
               run_dir: str) -> ConfigDict:
    """The train-loop config of one run: `c` with the task's settings and the mode's init and
    freeze spec."""

    rc = ConfigDict(c.to_dict())
    del rc["protocol"], rc["benchmark"]
    apply_task_settings(rc, task, c.protocol.size)
    if c.protocol.steps:
        every = max(1, c.protocol.steps // max(1, rc.train.steps // rc.train.eval_every))
        rc.train.steps = c.protocol.steps
        rc.train.eval_every = rc.train.checkpoint_every = every
    rc.optim.lr = lr
    rc.train.eval_at_start = False  # only the last evaluation is scored
    rc.train.seed = rc.data.seed = seed
    rc.data.scores_dir = run_dir
    rc.fpt.pretrained = mode != "random"
    rc.fpt.mode = "full" if mode == "full" else "frozen"
    switches = {k: bool(c.fpt[k]) for k in ("freeze_ln", "freeze_pos", "freeze_ff",
                                             "freeze_attn")}
    rc.optim.freeze = [] if mode == "full" else freeze_patterns(**switches)
    return rc


def run_one(c: ConfigDict, task: str, mode: str, lr: float, seed: int,
            out: str) -> Optional[dict]:
    """Train and score one run (a finished one of the same settings is read back); None if it
    was preempted."""
    run_dir = fs.join(out, task, mode, f"lr{lr:g}", f"seed{seed}")
    path = fs.join(run_dir, RESULT_JSON)
    rc = run_config(c, task, mode, lr, seed, run_dir)
    check_run_dir(run_dir, rc)
    if fs.exists(path):
        return fs.read_json(path)
    summary = loop.train_and_evaluate(rc, run_dir)
    if summary.get("preempted"):
        return None
    scores = read_scores(run_dir)
    last = scores[max(scores)]["scores"]
    trainable, total = fpt.trainable_count(checkpointing.read_model_config(run_dir),
                                           list(rc.optim.freeze))
    result = {"task": task, "mode": mode, "lr": lr, "seed": seed, "step": max(scores),
              "validation": last["validation"], "test": last["test"],
              "trainable": trainable, "params": total,
              "train_seconds": summary["elapsed_sec"]}
    if fs.is_primary():
        checkpointing.write_json_atomic(path, result)
    return result


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": [float(x) for x in v]}


def pick_lr(runs: dict[float, list[dict]], metric: str = "accuracy") -> float:
    """The lr of the best mean validation `metric` (ties: the smaller lr)."""
    means = {lr: np.mean([r["validation"][metric] for r in rs]) for lr, rs in runs.items()}
    return max(sorted(means), key=lambda lr: (-math.inf if math.isnan(means[lr])
                                              else means[lr], -lr))


def summarize(task: str, mode: str, runs: dict[float, list[dict]]) -> dict:
    """One results row: the chosen lr and the seeds' scores there."""
    # The lr is picked on the seeds every lr ran with (all, or the first with first_seed).
    common = set.intersection(*[{r["seed"] for r in v} for v in runs.values()])
    lr = pick_lr({k: [r for r in v if r["seed"] in common] for k, v in runs.items()})
    chosen = runs[lr]
    first = chosen[0]
    return {
        "task": task, "mode": mode, "lr": lr, "seeds": [r["seed"] for r in chosen],
        "test": {m: _mean_std([r["test"][m] for r in chosen]) for m in first["test"]},
        "validation": {m: _mean_std([r["validation"][m] for r in chosen])
                       for m in first["validation"]},
        "sweep": {f"{k:g}": float(np.mean([r["validation"]["accuracy"] for r in v
                                           if r["seed"] in common]))
                  for k, v in sorted(runs.items())},
        "trainable": first["trainable"], "params": first["params"],
        "fraction": first["trainable"] / first["params"],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| task | setting | test acc (%) | val acc (%) | lr | seeds | trainable params "
             "(fraction) | val acc by lr |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, v = r["test"]["accuracy"], r["validation"]["accuracy"]
        sweep = ", ".join(f"{lr}: {100 * a:.1f}" for lr, a in r["sweep"].items())
        lines.append(
            f"| {r['task']} | {MODE_TITLES[r['mode']]} | {100 * t['mean']:.1f} ± "
            f"{100 * t['std']:.1f} | {100 * v['mean']:.1f} ± {100 * v['std']:.1f} | "
            f"{r['lr']:g} | {','.join(str(s) for s in r['seeds'])} | {r['trainable']:,} of "
            f"{r['params']:,} ({100 * r['fraction']:.3g}%) | {sweep} |")
    return "\n".join(lines) + (
        "\n\nmean ± std over the seeds at the lr of the best validation accuracy (its last "
        "evaluation); accuracy per bit for bit tasks.\n")


def check_settings(c: ConfigDict, tasks: list[str], mode: str, lr: float, seed: int) -> None:
    """Refuse, before any run, a task without settings of `c.protocol.size`, impossible data
    values, and flags that changed a task setting of `c` (data sizes, batch size, steps): every
    run takes those from `TASK_SETTINGS`, so such a flag would be ignored without a word."""
    for task in tasks:
        try:
            rc = run_config(c, task, mode, lr, seed, "")
        except ValueError as e:  # apply_task_settings: no settings of that task and size
            raise ConfigError(f"config.protocol.tasks: {e}") from None
        check_data(rc.data)
    if not c.protocol.get("settings_of"):
        return
    task, size = c.protocol.settings_of.split(",")
    expected = ConfigDict(c.to_dict())
    apply_task_settings(expected, task, size)
    changed = config_diff(expected.to_dict(), c.to_dict())
    if changed:
        shown = ", ".join(f"config.{k}={v[1]}" for k, v in changed.items())
        raise ConfigError(
            f"the protocol takes each task's data sizes and steps from fpt_tasks.TASK_SETTINGS"
            f"[{c.protocol.size!r}] and would ignore {shown}; drop those flags "
            "(--config.protocol.steps sets the steps, --config.protocol.size the sizes) or "
            "train that one setting with train.py")


def evaluate(c: ConfigDict, out: str) -> Optional[dict]:
    """Run the protocol of `c.protocol`; returns the summary (None if preempted)."""
    tasks = _list(c.protocol.tasks, "tasks")
    modes = _list(c.protocol.modes, "modes")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"unknown config.protocol.modes {unknown}; choose from {MODES}")
    if {"pretrained", "full"} & set(modes) and not c.init:
        raise ConfigError("modes pretrained and full need config.init=WORKDIR (a converted "
                          "checkpoint or trained workdir); pass it or use "
                          "--config.protocol.modes=random")
    lrs = _list(c.protocol.lrs, "lrs", float)
    seeds = _list(c.protocol.seeds, "seeds", int)
    if c.protocol.sweep not in ("all", "first_seed"):
        raise ConfigError(f"unknown config.protocol.sweep {c.protocol.sweep!r}; choose all "
                          "or first_seed")
    check_settings(c, tasks, modes[0], lrs[0], seeds[0])
    rows = []
    with eval_output(out) as out:
        for task in tasks:
            for mode in modes:
                runs: dict[float, list[dict]] = {}
                sweep_seeds = seeds if c.protocol.sweep == "all" else seeds[:1]
                for lr in lrs:
                    for seed in sweep_seeds:
                        result = run_one(c, task, mode, lr, seed, out)
                        if result is None:
                            return None
                        runs.setdefault(lr, []).append(result)
                if c.protocol.sweep == "first_seed":
                    best = pick_lr(runs)
                    for seed in seeds[1:]:
                        result = run_one(c, task, mode, best, seed, out)
                        if result is None:
                            return None
                        runs[best].append(result)
                rows.append(summarize(task, mode, runs))
    summary = {"protocol": c.protocol.to_dict(), "init": c.init, "rows": rows}
    if fs.is_primary():
        checkpointing.write_json_atomic(fs.join(out, "results.json"), summary)
        fs.write_text(fs.join(out, "results.md"), markdown(rows))
    print(markdown(rows), flush=True)
    return summary
