"""The train loop: sharded init, jitted step, periodic eval, checkpoints, logging.

`train_and_evaluate(config, workdir)` is the whole job; `train.py` only parses flags. The
step is a pure function of (state, batch) jitted with explicit in/out shardings and the state
donated, so the same code runs on one CPU and on a sharded mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import importlib
import math
import os
import sys
import time
from typing import Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bigs_jax.models import make_config
from bigs_jax.train import checkpointing, metrics, optim, partitioning
from bigs_jax.train import growth as train_growth
from bigs_jax.train.objectives import OBJECTIVES
from bigs_jax.train.step import TrainState, make_eval_step, make_train_step


class ConfigError(ValueError):
    """A config or workdir problem the user must fix; reported as one line."""


# ---------------------------------------------------------------------------- workdir


def check_workdir(workdir: str) -> str:
    """Absolute workdir path after checking it can be written, creating nothing."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    probe = workdir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"workdir {workdir} is under {probe}, which is a file; "
                          "pass a directory path to --workdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} is not writable ({probe} denies writes); "
                          "pass a writable --workdir")
    return workdir


def model_config_from(config: ConfigDict, data_overrides: Optional[dict] = None):
    """The frozen model config of a run.

    `config.model` names a registry entry (name + overrides). With `config.init` the
    architecture comes from that workdir's model.json instead, and `config.model` keys that are
    set (head, num_labels, dropout, ...) override it. `data_overrides` are what the data fixes
    (vocab_size, num_labels, image size): they win over the registry's values, and must agree
    with an `init` checkpoint's vocabulary.
    """
    data_overrides = dict(data_overrides or {})
    overrides = {k: v for k, v in config.model.items() if k != "name" and v is not None}
    if config.get("init"):
        base = checkpointing.read_model_config(checkpointing.resolve(config.init)[0])
        vocab = data_overrides.pop("vocab_size", None)
        if vocab is not None and vocab != getattr(base, "vocab_size", vocab):
            raise ConfigError(
                f"config.init {config.init} has a vocabulary of {base.vocab_size} ids but the "
                f"data's has {vocab}; use the checkpoint's vocabulary for config.data")
        try:
            return dataclasses.replace(base, **{**overrides, **data_overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.model (over config.init {config.init}): {e}") from None
    for key, value in data_overrides.items():
        overrides.setdefault(key, value)
    if "max_len" not in overrides and "seq_len" in config.data:
        overrides["max_len"] = config.data.seq_len
    try:
        return make_config(config.model.name, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def prepare_workdir(workdir: str, config: ConfigDict, model_config) -> None:
    """Write config.json and model.json; a workdir of a different model is refused."""
    path = os.path.join(workdir, checkpointing.MODEL_JSON)
    if os.path.exists(path):
        existing = checkpointing.read_model_config(workdir)
        if existing != model_config:
            changed = sorted(f.name for f in dataclasses.fields(existing)
                             if getattr(existing, f.name) != getattr(model_config, f.name, None))
            raise ConfigError(f"workdir {workdir} holds a run of a different model (differs in "
                              f"{changed}); use a new --workdir or the original config")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        checkpointing.write_json_atomic(os.path.join(workdir, checkpointing.CONFIG_JSON),
                                        config.to_dict())
        checkpointing.write_json_atomic(path, checkpointing.model_json(model_config))


# ---------------------------------------------------------------------------- data


class DataSource(Protocol):
    """What the loop needs from a dataset: `config.data.source` names a module whose
    `data_source(config)` returns one (see DATA_SOURCES)."""

    def model_overrides(self) -> dict:
        """Model options the data fixes, e.g. {"vocab_size": 8192} or {"num_labels": 3}."""

    def iterators(self, start_step: int) -> tuple[Iterator[dict], list[dict]]:
        """(host-local train batches from batch `start_step` on, held-out eval batches)."""


# config.data.source -> module with `data_source(config) -> DataSource`.
DATA_SOURCES = {
    "seqio": "bigs_jax.train.loop",
    "images": "bigs_jax.data.images",
    "glue": "bigs_jax.evals.glue",
    "scrolls": "bigs_jax.evals.scrolls",
}


def make_data_source(config: ConfigDict) -> DataSource:
    name = config.data.get("source", "seqio")
    if name not in DATA_SOURCES:
        raise ConfigError(f"unknown config.data.source {name!r}; choose one of "
                          f"{sorted(DATA_SOURCES)}")
    return importlib.import_module(DATA_SOURCES[name]).data_source(config)


def task_vocab_size(task_name: str) -> int:
    """Vocabulary size of a SeqIO task's or mixture's `input_ids` feature.

    `task_name` is a registered name or a task spec (`bigs_jax.data.tasks.get_task`).
    """
    from bigs_jax.data import pipeline, tasks  # noqa: F401  (registers the built-in tasks)

    try:
        task = tasks.get_task(task_name)
    except ValueError as e:
        raise ConfigError(f"config.data.task: {e}") from None
    features = task.tasks[0].output_features if hasattr(task, "tasks") else task.output_features
    return features["input_ids"].vocabulary.vocab_size


@dataclasses.dataclass
class SeqioSource:
    """A registered SeqIO task or mixture (`config.data.task`) through `data.pipeline`."""

    config: ConfigDict

    def model_overrides(self) -> dict:
        return {"vocab_size": task_vocab_size(self.config.data.task)}

    def iterators(self, start_step: int):
        return make_data(self.config, start_step=start_step)


def data_source(config: ConfigDict) -> SeqioSource:
    return SeqioSource(config)


def make_data(config: ConfigDict, *, start_step: int):
    """(train iterator from `start_step`, list of eval batches) of a SeqIO task.

    With `config.data.streaming`, both are streamed (`data.streaming`): the eval split is read
    only as far as its first `eval_batches` batches (all of it when 0), and hosts whose eval
    streams end early get all-zero batches, so every host runs as many eval steps.
    """
    from bigs_jax.data import pipeline, streaming

    d = config.data
    kw = dict(batch_size=d.batch_size, seq_len=d.seq_len, seed=d.seed,
              shard_index=jax.process_index(), num_shards=jax.process_count())
    if "mask_rate" in d:
        kw["mask_rate"] = d.mask_rate
    if d.get("whole_word"):
        kw["whole_word"] = True
    if d.get("streaming"):
        train = streaming.make_stream_iterator(
            d.task, split="train", start_step=start_step,
            shuffle_buffer=d.get("shuffle_buffer", 10_000), **kw)
        stream = streaming.make_stream_iterator(
            d.task, split=d.eval_split, num_epochs=1, **{**kw, "batch_size": d.eval_batch_size})
        evals = list(itertools.islice(stream, d.eval_batches or None))
        counts = np.array([len(evals)])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(np.int32(len(evals))))
        if counts.min() == 0:  # raised on every host, so none waits for the others
            raise ConfigError(
                f"config.data.eval_split {d.eval_split!r} of {d.task!r} has no rows for host "
                f"{int(counts.argmin())} of {jax.process_count()}; use a larger split")
        evals += [{k: np.zeros_like(v) for k, v in evals[0].items()}] * (
            int(counts.max()) - len(evals))
        return train, evals
    train = pipeline.make_iterator(d.task, split="train", start_step=start_step, **kw)
    evals = list(pipeline.make_iterator(d.task, split=d.eval_split, num_epochs=1,
                                        **{**kw, "batch_size": d.eval_batch_size}))
    if d.eval_batches:
        evals = evals[: d.eval_batches]
    return train, evals


def _refuse_unsupported_packing(batch: dict, model_config, config: ConfigDict) -> None:
    """Packed batches for a model that cannot keep segments apart stop the run at start-up."""
    if "segment_ids" not in batch:
        return
    from bigs_jax.models import family_of

    module = sys.modules[family_of(model_config).model_cls.__module__]
    if not getattr(module, "SUPPORTS_SEGMENTS", True):
        raise ConfigError(f"config.data.task {config.data.task!r} packs examples, but "
                          f"{module.SEGMENTS_REFUSAL}")


def batch_units(batch: dict) -> int:
    """What throughput counts in a host batch: real tokens, or examples when there is no mask."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(len(next(iter(batch.values()))))


def to_global(batch: dict, sharding) -> dict:
    """Host-local numpy batch → global jax arrays on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ---------------------------------------------------------------------------- main


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir` (resuming from its latest checkpoint); return a summary.

    Nothing is written to the workdir before the config, data and model have been validated.
    """
    workdir = check_workdir(workdir)
    t = config.train
    source = make_data_source(config)
    model_config = model_config_from(config, source.model_overrides())
    # Growth schedule (train/growth.py): the model of the stage the run resumes in.
    base_model_config = model_config
    try:
        events = train_growth.growth_events(config)
        train_growth.config_at(base_model_config, events, t.steps)  # every stage is valid
    except ValueError as e:
        raise ConfigError(f"config.growth: {e}") from None
    if events:
        ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINTS)
        resumed = checkpointing.Checkpointer(workdir).latest_step() if os.path.isdir(
            ckpt_dir) else None
        model_config = train_growth.config_at(base_model_config, events, resumed or 0)
        train_growth.sync_model_json(workdir, base_model_config, events, model_config)
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"unknown config.objective {config.objective!r}; choose one of "
                          f"{sorted(OBJECTIVES)}")
    loss_fn = functools.partial(OBJECTIVES[config.objective],
                                max_predictions=t.get("max_predictions", 0))

    mesh = partitioning.make_mesh(config.mesh.shape,
                                  dcn_shape=config.mesh.get("dcn_shape", (1, 1, 1)))
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        from bigs_jax import build

        abstract = nnx.eval_shape(lambda: build(model_config, seed=t.seed))
        graphdef, abstract_state = nnx.split(abstract)
        param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_state, mesh))
        abstract_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nnx.to_pure_dict(abstract_state), param_shardings)
        tx, lr_schedule = optim.make_optimizer(config.optim, abstract_params, t.steps)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = _opt_shardings(tx, abstract_params)
        abstract_opt = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_opt, opt_shardings)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state_shardings = TrainState(step=replicated, params=param_shardings,
                                     opt_state=opt_shardings, rng=replicated)

        @functools.partial(jax.jit, out_shardings=state_shardings)
        def init_state():
            params = nnx.to_pure_dict(nnx.state(build(model_config, seed=t.seed)))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params),
                              rng=jax.random.key_data(jax.random.key(t.seed + 1)))

        data_sharding = partitioning.batch_sharding(mesh, rules)
        train_step = jax.jit(make_train_step(graphdef, tx, loss_fn,
                                             grad_accum_steps=t.get("grad_accum_steps", 1),
                                             nan_at_step=t.get("debug_nan_at_step", 0),
                                             grad_norm=t.get("log_grad_norm", True)),
                             in_shardings=(state_shardings, data_sharding),
                             out_shardings=(state_shardings, replicated), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(graphdef, loss_fn),
                            in_shardings=(param_shardings, data_sharding),
                            out_shardings=replicated)
        # Sources that score predictions (GLUE, SCROLLS: MCC, F1, correlations) get the
        # model's logits on each of their eval batches at every evaluation.
        scorer = None
        if hasattr(source, "score"):
            scorer = (source.score, jax.jit(_make_predict_step(graphdef),
                                            in_shardings=(param_shardings, data_sharding),
                                            out_shardings=replicated))

        ckpt = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints,
                                          save_every=t.checkpoint_every) if os.path.isdir(
            os.path.join(workdir, checkpointing.CHECKPOINTS)) else None
        start = ckpt.latest_step() if ckpt else None
        train_iter, eval_batches = source.iterators(start or 0)
        first = next(train_iter)
        train_iter = itertools.chain([first], train_iter)
        _refuse_unsupported_packing(first, model_config, config)
        abstract_state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            params=abstract_params, opt_state=abstract_opt,
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
        abstract_batch = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),)
                                                  + v.shape[1:], v.dtype, sharding=data_sharding)
                          for k, v in first.items()}
        # Compile ahead of time: the FLOP count and memory of the real step, before training.
        compiled = train_step.lower(abstract_state, abstract_batch).compile()
        cost = metrics.step_cost(compiled)
        if t.get("dry_run"):
            return _dry_run(config, model_config, abstract_params, mesh, first, cost)
        prepare_workdir(workdir, config, model_config)
        if ckpt is None:
            ckpt = checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints,
                                              save_every=t.checkpoint_every)
        if start is not None:
            params, opt_state, meta = ckpt.restore(start, abstract_params, abstract_opt)
            state = TrainState(step=jnp.asarray(start, jnp.int32), params=params,
                               opt_state=opt_state,
                               rng=jnp.asarray(np.asarray(meta["rng"], np.uint32)))
            state = jax.device_put(state, state_shardings)
        else:
            state = init_state()
            if config.get("init"):
                try:
                    params, report = checkpointing.restore_matching(config.init, state.params)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                state = state.replace(params=params)
                print(report, flush=True)

        grow = None
        if events:
            def grow(state, step, ckpt, writer):
                train_growth.grow_checkpoint(config, workdir, state, base_model_config, events,
                                             step, ckpt, writer)
        summary = _run(config, workdir, state, compiled, eval_step, train_iter, eval_batches,
                       data_sharding, ckpt, lr_schedule, cost, start, scorer,
                       stop_step=train_growth.next_stop(events, start or 0, t.steps), grow=grow,
                       eval_first=start in {int(e["step"]) for e in events})
    if summary["steps"] < t.steps and not summary["preempted"]:  # stopped to grow: resume
        before = summary
        summary = train_and_evaluate(config, workdir)
        for key in ("eval_loss", "eval_metrics", "train_loss"):
            summary[key] = {**before[key], **summary[key]}
        step = before["steps"]
        summary["growth"] = {step: {"eval_loss_before": before["eval_loss"].get(step),
                                    "eval_loss_after": summary["eval_loss"].get(step)},
                             **before.get("growth", {}), **summary.get("growth", {})}
        summary["elapsed_sec"] = round(before["elapsed_sec"] + summary["elapsed_sec"], 1)
        summary["tokens"] += before["tokens"]
    return summary


def _make_predict_step(graphdef):
    """(params, token batch) -> the model's logits, without dropout."""

    def predict_step(params, batch):
        model = nnx.merge(graphdef, params)
        return model(batch["input_ids"], batch.get("attention_mask"),
                     batch.get("token_type_ids"), deterministic=True, rngs=None).logits

    return predict_step


def _dry_run(config, model_config, abstract_params, mesh, batch, cost) -> dict:
    """Print what one step needs per device, then stop without training or writing."""
    n_params = checkpointing.param_count(abstract_params)
    rows = next(iter(batch.values())).shape[0]
    tokens = (batch["input_ids"].size if "input_ids" in batch else rows) * jax.process_count()
    lines = [
        f"dry run: {config.model.name} ({n_params:,} params), mesh "
        f"{dict(zip(mesh.axis_names, mesh.devices.shape))} on {jax.device_count()} "
        f"{jax.devices()[0].device_kind} device(s), global batch {tokens:,} tokens",
        f"  FLOPs per step per device: {cost['flops']:.4g}"
        f" ({cost['flops'] * jax.device_count() / tokens:.4g} per token, all devices)",
    ]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"):
        if key in cost:
            lines.append(f"  {key.replace('_', ' ')} per device: {cost[key] / 2**30:.3f} GiB")
    if "peak_bytes" in cost:
        lines.append(f"  estimated peak memory per device: {cost['peak_bytes'] / 2**30:.3f} GiB")
    print("\n".join(lines), flush=True)
    return {"dry_run": True, "params": n_params, "tokens_per_step": tokens, **cost}


def _opt_shardings(tx, abstract_params):
    """Shardings of the optimizer state, as XLA propagates them from the params' shardings.

    Moments come out sharded like their parameters and counters replicated; compiling
    `tx.init` is cheap and spares matching optimizer-state paths to parameter paths by hand.
    """
    return jax.jit(tx.init).lower(abstract_params).compile().output_shardings


def _run(config, workdir, state, train_step, eval_step, train_iter, eval_batches,
         data_sharding, ckpt, lr_schedule, cost, start, scorer=None, stop_step=None, grow=None,
         eval_first=False):
    """Train from `state` to step `stop_step` (default train.steps). At a growth stop (< steps)
    the small state is evaluated, not saved, and `grow(state, step, ckpt, writer)` saves the
    grown one; a run resumed at a growth step (`eval_first`) evaluates the grown model first."""
    t = config.train
    stop_step = t.steps if stop_step is None else stop_step
    step = int(state.step)
    writer = metrics.writer(os.path.join(workdir, "tb"))
    print(f"workdir: {workdir}", flush=True)
    print(f"model: {config.model.name} ({checkpointing.param_count(state.params):,} params), "
          f"{'resuming from step ' + str(step) if start is not None else 'fresh start'}, "
          f"training to step {t.steps}", flush=True)

    def evaluate() -> dict:
        """{"loss": ..., and each sum the objective reports, per unit of loss weight}."""
        sums, weight = {}, 0.0
        for b in eval_batches:
            s, w, extra = jax.device_get(eval_step(state.params, to_global(b, data_sharding)))
            weight += float(w)
            for key, value in {"loss": s, **extra}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {k: v / max(weight, 1.0) for k, v in sums.items()}

    def log_eval(step: int) -> None:
        results = evaluate()
        if scorer is not None:
            score, predict_step = scorer
            results.update(score(step, lambda b: np.asarray(jax.device_get(
                predict_step(state.params, to_global(b, data_sharding))))))
        history[step], eval_metrics[step] = results["loss"], results
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        bar.write(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in results.items()))

    history, train_history, eval_metrics = {}, {}, {}
    bar = metrics.Progress(step, t.steps)
    if (start is None and t.get("eval_at_start", True)) or eval_first:
        log_eval(step)
    peak = metrics.peak_flops(t.get("peak_flops_per_device", 0.0))
    profiler = metrics.Profiler(os.path.join(workdir, "profile"), t.get("profile_start_step", 0),
                                t.get("profile_num_steps", 5))
    meter = metrics.Throughput()
    t_start = time.perf_counter()
    tokens_seen = 0
    preempted = False
    stop = metrics.StopSignal()
    try:
        while step < stop_step:
            profiler.before(step)
            batch = next(train_iter)
            tokens = batch_units(batch)
            state, stats = train_step(state, to_global(batch, data_sharding))
            step += 1
            meter.add(tokens)
            tokens_seen += tokens
            profiler.after(step, stats)
            preempted = stop.received or (
                jax.process_count() > 1 and ckpt.reached_preemption(step) and "preemption")
            growing = step == stop_step < t.steps and not preempted
            saving = (step % t.checkpoint_every == 0 or step == t.steps or preempted
                      ) and not growing
            if step % t.log_every == 0 or saving:
                # Checked before every save, so a checkpoint never holds non-finite params.
                stats = jax.device_get(stats)
                loss = float(stats["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint is step "
                        f"{ckpt.latest_step()}; lower optim.lr or raise optim.warmup_steps")
                train_history[step] = loss
                scalars = {"train/loss": loss, "train/lr": float(lr_schedule(step - 1))}
                if "grad_norm" in stats:
                    scalars["train/grad_norm"] = float(stats["grad_norm"])
                rate = meter.read()
                if rate:
                    scalars.update({"perf/tokens_per_sec": rate["tokens_per_sec"],
                                    "perf/step_time": rate["step_time"],
                                    "perf/tflops_per_device":
                                        cost["flops"] / rate["step_time"] / 1e12})
                    if peak:
                        scalars["perf/mfu"] = cost["flops"] / rate["step_time"] / peak
                writer.write_scalars(step, scalars)
                bar.update(step, tokens, {"loss": loss, "tok/s": round(
                    scalars.get("perf/tokens_per_sec", 0.0))})
            else:
                bar.update(step, tokens, {})
            if step % t.eval_every == 0 or step == t.steps or growing:
                log_eval(step)
            if growing:
                grow(state, step, ckpt, writer)
            if saving:
                ckpt.save(step, state.params, state.opt_state,
                          {"rng": np.asarray(state.rng).tolist(), "step": step,
                           "data": {"task": config.data.task, "batches_consumed": step}},
                          force=step == t.steps or preempted)
            if preempted:
                bar.write(f"stopping at step {step} on {stop.received}; checkpoint saved, "
                          "rerun the same command to resume")
                break
    finally:
        profiler.close()
        stop.restore()
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.flush()
    elapsed = time.perf_counter() - t_start
    summary = {"workdir": workdir, "steps": step, "preempted": bool(preempted),
               "elapsed_sec": round(elapsed, 1),
               "tokens": tokens_seen, "eval_loss": history, "eval_metrics": eval_metrics,
               "train_loss": train_history,
               "checkpoints": checkpointing.Checkpointer(workdir).all_steps()}
    first = history.get(0)
    last = history.get(step)
    line = f"done: {step} steps in {elapsed:.0f}s"
    if first is not None and last is not None:
        line += f", eval loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.1f}% lower)"
    elif last is not None:
        line += f", eval loss {last:.3f}"
    print(f"{line}; checkpoints {summary['checkpoints']} in {workdir}", flush=True)
    return summary
