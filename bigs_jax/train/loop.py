"""The train loop: sharded init, jitted step, periodic eval, checkpoints, logging.

`train_and_evaluate(config, workdir)` is the whole job; `train.py` only parses flags. It runs
in four stages: build the program (shardings, jitted init/train/eval steps), restore or
initialize the state, run the steps, report. The step is a pure function of (state, batch)
jitted with explicit in/out shardings and the state donated, so the same code runs on one CPU
and on a sharded mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import ConfigDict

# The sources of data/ register themselves; evals/ registers its own (see data.registry).
from bigs_jax import fs
from bigs_jax.data import fpt_tasks, images, registry, seqio_source  # noqa: F401
from bigs_jax.errors import ConfigError, DamagedCheckpoint
from bigs_jax.models import build, family_of
from bigs_jax.train import checkpointing, metrics, optim, partitioning
from bigs_jax.train import growth as train_growth
from bigs_jax.train.objectives import OBJECTIVES, forward
from bigs_jax.train.step import TrainState, make_eval_step, make_train_step
from bigs_jax.train.config import check_values
from bigs_jax.train.workdir import (
    check_resume_config,
    check_same_model,
    check_workdir,
    model_config_from,
    prepare_workdir,
    record_vocabulary,
)

__all__ = ["ConfigError", "train_and_evaluate"]


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir` (resuming from its latest checkpoint); return a summary.

    Nothing is written to the workdir before the config, data and model have been validated.
    """
    workdir = check_workdir(workdir)
    use_compilation_cache(config.train.get("compilation_cache_dir", ""))
    check_values(config)
    check_resume_config(workdir, config)
    source = registry.make_data_source(config)
    base_model_config = model_config_from(config, source.model_overrides())
    events = _growth_events(config, base_model_config)
    model_config = _stage_model_config(workdir, base_model_config, events)
    try:
        mesh = partitioning.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        program = Program.build(config, model_config, mesh, rules, hasattr(source, "score"),
                                getattr(source, "device_batch", None))
        ckpt = _existing_checkpointer(workdir, config.train)
        check_same_model(workdir, model_config)
        steps = _stage_steps(ckpt, base_model_config, events, model_config)
        try:
            restored = Restored.newest_intact(ckpt, program, steps) if ckpt else None
        except DamagedCheckpoint as e:
            if not ckpt or set(ckpt.all_steps()) == set(steps):
                raise
            # Every step of the newest growth stage is damaged: set them aside and resume
            # in the stage of the newest step left (other shapes, so another program).
            _set_aside(ckpt, e.skipped, "an earlier growth stage")
            return train_and_evaluate(config, workdir)
        start = restored.step if restored else None
        raw_train, train_iter, eval_batches = _checked_data(source, start, model_config, ckpt)
        first = next(train_iter)
        train_iter = itertools.chain([first], train_iter)
        _refuse_unsupported_packing(first, model_config, config)
        # Compile ahead of time: the FLOP count and memory of the real step, before training.
        traced = program.train_step.trace(program.abstract_state(),
                                          program.abstract_batch(first))
        compiled = traced.lower().compile()
        cost = metrics.step_cost(traced, compiled, program.mesh.size)
        for loop_line in cost["uncounted_loops"]:
            print(f"warning: FLOPs: {loop_line}", flush=True)
        if config.train.dry_run:
            return _dry_run(config, program, first, cost)
        # A config.init that cannot be read fails here, before anything is written.
        fresh = None if restored else _init(config, program)
        prepare_workdir(workdir, config, model_config)
        record_vocabulary(workdir, getattr(source, "vocabulary", lambda: None)())
        ckpt = ckpt or checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                                  save_every=config.train.checkpoint_every)
        state = restored.state(ckpt) if restored else fresh
        scorer = getattr(source, "score", None)
        grow = None
        if events:
            def grow(state, step, log):
                train_growth.grow_checkpoint(config, workdir, state, base_model_config, events,
                                             step, ckpt, log.writer,
                                             data_state=data_state(raw_train, step))
        summary = _run(config, workdir, program, state, compiled, train_iter, raw_train,
                       Evaluator(program, eval_batches, scorer), ckpt, cost, start,
                       stop_step=train_growth.next_stop(events, start or 0, config.train.steps),
                       grow=grow, eval_first=start in {int(e["step"]) for e in events})
    if summary["steps"] < config.train.steps and not summary["preempted"]:
        # Stopped at a growth step with the grown state saved: resume it as a new stage
        # (rebuilt, re-sharded and re-compiled for the grown model).
        summary = _join_stages(summary, train_and_evaluate(config, workdir))
    return summary


def use_compilation_cache(directory: str) -> None:
    """Keep every program this process compiles in jax's persistent cache at `directory`
    (local or gs://...; '' leaves jax's setting as it is), so a rerun, a resume or a
    preempted job's restart loads its programs instead of compiling them again."""
    if not directory:
        return
    try:
        directory = fs.resolve(directory)
    except ValueError as e:
        raise ConfigError(f"config.train.compilation_cache_dir {e}") from None
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # a cache opened at another directory is dropped
    # Every program, however quick to compile: the train and eval steps take seconds on a
    # CPU but minutes on a pod, and a threshold would make "cached or not" depend on timing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------- growth


def _growth_events(config: ConfigDict, base_model_config) -> list[dict]:
    """The run's growth schedule (`config.growth`), every stage's model checked."""
    try:
        events = train_growth.growth_events(config)
        train_growth.config_at(base_model_config, events, config.train.steps)
    except ValueError as e:
        raise ConfigError(f"config.growth: {e}") from None
    return events


def _stage_model_config(workdir: str, base_model_config, events: list[dict]):
    """The model of the growth stage the run resumes in (the base model without growth)."""
    if not events:
        return base_model_config
    ckpt = _existing_checkpointer(workdir, None)
    model_config = train_growth.config_at(base_model_config, events,
                                          (ckpt.latest_step() if ckpt else None) or 0)
    train_growth.sync_model_json(workdir, base_model_config, events, model_config)
    return model_config


def _join_stages(before: dict, after: dict) -> dict:
    """One summary of two growth stages, with each growth's eval loss before and after."""
    summary = dict(after)
    for key in ("eval_loss", "eval_metrics", "train_loss"):
        summary[key] = {**before[key], **after[key]}
    step = before["steps"]
    summary["growth"] = {**before.get("growth", {}),
                         step: {"eval_loss_before": before["eval_loss"].get(step),
                                "eval_loss_after": after["eval_loss"].get(step)},
                         **after.get("growth", {})}
    summary["elapsed_sec"] = round(before["elapsed_sec"] + after["elapsed_sec"], 1)
    summary["tokens"] = before["tokens"] + after["tokens"]
    return summary


# ---------------------------------------------------------------------------- program


@dataclasses.dataclass
class Program:
    """The jitted functions of a run and the shardings they read and write."""

    model_config: Any
    graphdef: Any
    tx: Any
    lr_schedule: Callable[[int], Any]
    mesh: jax.sharding.Mesh
    abstract_params: Any             # ShapeDtypeStructs carrying the params' shardings
    abstract_opt: Any
    state_shardings: TrainState
    data_sharding: jax.sharding.NamedSharding
    init_state: Callable[[], TrainState]
    train_step: Any                  # jax.jit(state, batch) -> (state, stats)
    eval_step: Any                   # jax.jit(params, batch) -> (loss sum, weight, extra)
    predict_step: Optional[Any]      # jax.jit(params, batch) -> logits, for scoring sources

    @classmethod
    def build(cls, config: ConfigDict, model_config, mesh, rules, scoring: bool,
              device_batch: Optional[Callable[[dict], dict]] = None) -> "Program":
        """Shardings from an abstract model, then the jitted steps; allocates nothing.
        `device_batch` (the source's, if any) maps each batch inside the steps."""
        t = config.train
        if config.objective not in OBJECTIVES:
            raise ConfigError(f"unknown config.objective {config.objective!r}; choose one of "
                              f"{sorted(OBJECTIVES)}")
        loss_fn = _on_device_batch(functools.partial(OBJECTIVES[config.objective],
                                                     max_predictions=t.max_predictions),
                                   device_batch)
        graphdef, abstract_state = nnx.split(nnx.eval_shape(
            lambda: build(model_config, seed=t.seed)))
        param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_state, mesh))
        abstract_params = _with_shardings(nnx.to_pure_dict(abstract_state), param_shardings)
        indivisible = partitioning.indivisible(abstract_params)
        if indivisible:
            raise ConfigError(f"config.mesh.shape splits parameters unevenly: "
                              f"{'; '.join(indivisible[:3])}; set config.model.vocab_multiple="
                              "128 for a vocabulary axis, or mesh/model sizes that divide")
        tx, lr_schedule = optim.make_optimizer(config.optim, abstract_params, t.steps,
                                                 train_growth.restarts(config),
                                                 stack_layers=t.stacked_update)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = partitioning.opt_state_shardings(abstract_opt, abstract_params,
                                                         param_shardings, mesh)
        abstract_opt = _with_shardings(abstract_opt, opt_shardings)
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
        params_and_batch = dict(in_shardings=(param_shardings, data_sharding),
                                out_shardings=replicated)
        train_step = jax.jit(make_train_step(graphdef, tx, loss_fn,
                                             trainable=optim.trainable_mask(config.optim,
                                                                            abstract_params),
                                             grad_accum_steps=t.grad_accum_steps,
                                             grad_norm=t.log_grad_norm),
                             in_shardings=(state_shardings, data_sharding),
                             out_shardings=(state_shardings, replicated), donate_argnums=0)
        return cls(model_config=model_config, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                   mesh=mesh, abstract_params=abstract_params, abstract_opt=abstract_opt,
                   state_shardings=state_shardings, data_sharding=data_sharding,
                   init_state=init_state, train_step=train_step,
                   eval_step=jax.jit(make_eval_step(graphdef, loss_fn), **params_and_batch),
                   predict_step=(jax.jit(_make_predict_step(graphdef, device_batch),
                                         **params_and_batch)
                                 if scoring else None))

    def abstract_state(self) -> TrainState:
        replicated = self.state_shardings.step
        return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                          params=self.abstract_params, opt_state=self.abstract_opt,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))

    def abstract_batch(self, host_batch: dict) -> dict:
        """The global batch that `host_batch` is this process's part of."""
        return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:],
                                        v.dtype, sharding=self.data_sharding)
                for k, v in host_batch.items()}

    def to_global(self, batch: dict) -> dict:
        """Host-local numpy batch → global jax arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.data_sharding, v)
                for k, v in batch.items()}


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _on_device_batch(loss_fn: Callable, device_batch: Optional[Callable]) -> Callable:
    """`loss_fn` on `device_batch(batch)` (e.g. uint8 pixels normalised on the device)."""
    if device_batch is None:
        return loss_fn
    return lambda model, batch, **kw: loss_fn(model, device_batch(batch), **kw)


def _make_predict_step(graphdef, device_batch: Optional[Callable] = None):
    """(params, token batch) -> the model's logits, without dropout."""

    def predict_step(params, batch):
        batch = device_batch(batch) if device_batch is not None else batch
        return forward(nnx.merge(graphdef, params), batch, deterministic=True,
                       rngs=None).logits

    return predict_step


def _checked_data(source, start: Optional[int], model_config, ckpt
                  ) -> tuple[Iterator[dict], Iterator[dict], Iterable[dict]]:
    """(the source's train iterator, the same with every batch's token ids checked against
    the model's vocabulary on the host, eval batches, checked too): the compiled step would
    turn a foreign id into NaN or garbage. Eval batches held in a list are checked now,
    streamed ones (images) as they are read. A run resumed at `start` restores its input
    position from that checkpoint (`resume_input`)."""
    raw, eval_batches = source.iterators(start or 0)
    if start is not None:
        resume_input(raw, ckpt, start)
    sizes = getattr(model_config, "vocab_size", None), getattr(model_config, "type_vocab_size",
                                                                None)
    if not isinstance(eval_batches, list):
        eval_batches = registry.CheckedEvalBatches(eval_batches, *sizes)
    else:
        for i, batch in enumerate(eval_batches):
            registry.check_token_ids(batch, sizes[0], f"config.data's eval batch {i}", sizes[1])
    return raw, registry.checked_batches(raw, sizes[0], start or 0, sizes[1]), eval_batches


def resume_input(train_iter, ckpt, step: int) -> None:
    """Put a train iterator that keeps its position (`state`/`restore`, a streamed input) where
    checkpoint `step` left this process's input, in time independent of `step`. Without a
    position it can restore, the iterator replays its input to there (time grows with
    `step`): one line says why. Other iterators resume by their start step alone."""
    if not hasattr(train_iter, "restore"):
        return
    try:
        saved = ckpt.restore_data_state(step)
        if saved is not None:
            train_iter.restore(saved)
            return
        why = ("it holds none for this process: saved by an older bigs_jax, or by another "
               "number of processes")
    except ValueError as e:
        why = str(e)
    print(f"data: checkpoint step {step} has no input position to restore ({why}); replaying "
          f"the input's first {step} batches to resume there", flush=True)


def data_state(train_iter, step: int) -> Optional[bytes]:
    """The input position to save with checkpoint `step` (None for an iterator without one):
    that of exactly the `step` batches the loop has consumed."""
    if not hasattr(train_iter, "state"):
        return None
    if train_iter.step != step:
        raise RuntimeError(f"the train iterator is at step {train_iter.step}, not {step}: "
                           "a batch pulled ahead would be lost on resume")
    return train_iter.state()


def _refuse_unsupported_packing(batch: dict, model_config, config: ConfigDict) -> None:
    """Packed batches for a model that cannot keep segments apart stop the run at start-up."""
    family = family_of(model_config)
    if "segment_ids" in batch and family.segments_refusal:
        raise ConfigError(f"config.data.task {config.data.task!r} packs examples, but "
                          f"{family.segments_refusal}")


# ---------------------------------------------------------------------------- state


def _existing_checkpointer(workdir: str, t: Optional[ConfigDict]
                           ) -> Optional[checkpointing.Checkpointer]:
    """The workdir's checkpoints, if it has any (opening none creates nothing); `t` (the
    train section) sets retention, None opens them read-only in effect."""
    if not fs.isdir(fs.join(workdir, checkpointing.CHECKPOINTS)):
        return None
    if t is None:
        return checkpointing.Checkpointer(workdir)
    return checkpointing.Checkpointer(workdir, keep=t.keep_checkpoints,
                                      save_every=t.checkpoint_every)


@dataclasses.dataclass
class Restored:
    """The newest checkpoint of a workdir that restores, and the damaged newer ones."""

    step: int
    train_state: TrainState
    skipped: list  # checkpointing.DamagedCheckpoint of each newer step, newest first

    @classmethod
    def newest_intact(cls, ckpt, program: Program, steps: list[int]) -> Optional["Restored"]:
        """None if the workdir has no checkpoint; DamagedCheckpoint if none of `steps` (those
        of the program's growth stage) is intact."""
        if not ckpt.all_steps():
            return None
        step, (params, opt_state, meta), skipped = ckpt.restore_newest_intact(
            program.abstract_params, program.abstract_opt, steps)
        state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                           opt_state=opt_state, rng=jnp.asarray(np.asarray(meta["rng"],
                                                                           np.uint32)))
        return cls(step, jax.device_put(state, program.state_shardings), skipped)

    def state(self, ckpt) -> TrainState:
        """The restored state, after moving the damaged newer steps out of the manager's
        reach (the run retrains and saves those steps anew; nothing is deleted)."""
        _set_aside(ckpt, self.skipped, f"step {self.step}")
        return self.train_state


def _set_aside(ckpt, skipped: list, resume_from: str) -> None:
    """Move the damaged steps of `skipped` out of the manager's reach, a warning line each."""
    for damaged in skipped:
        where = damaged.step
        if jax.process_index() == 0:
            where = ckpt.set_aside(damaged.step)
        print(f"warning: checkpoint step {damaged.step} is damaged ({damaged.why}); moved "
              f"to {where} (kept, not deleted); resuming from {resume_from}", flush=True)
    if skipped and jax.process_count() > 1:
        multihost_utils.sync_global_devices("bigs_jax damaged checkpoints set aside")
        ckpt.manager.reload()


def _stage_steps(ckpt, base_model_config, events: list[dict], model_config) -> list[int]:
    """The checkpoint steps saved in `model_config`'s growth stage (all steps without
    growth): a step of another stage holds other shapes, and failing to restore it onto this
    stage's program would be no sign of damage."""
    steps = ckpt.all_steps() if ckpt else []
    return [s for s in steps
            if not events or train_growth.config_at(base_model_config, events, s) == model_config]


def _init(config: ConfigDict, program: Program) -> TrainState:
    """A fresh init (from `config.init`'s params if set)."""
    state = program.init_state()
    if config.init:
        # Wrapper families (FPT) restore `config.init` under their backbone's prefix.
        restore = family_of(program.model_config).restore_init or (
            lambda c, p: checkpointing.restore_matching(c.init, p))
        try:
            params, report = restore(config, state.params)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        state = state.replace(params=params)
        print(report, flush=True)
    return state


# ---------------------------------------------------------------------------- run


@dataclasses.dataclass
class Evaluator:
    """Eval loss (and the source's own scores, if it scores predictions) of given params."""

    program: Program
    batches: Iterable[dict]          # a list, or a stream read afresh at each evaluation
    score: Optional[Callable] = None   # source.score(step, predict) -> {metric: value}

    def __call__(self, params, step: int) -> dict:
        """{"loss": ..., each sum the objective reports, per unit of loss weight, scores}."""
        sums, weight = {}, 0.0
        for b in self.batches:
            s, w, extra = jax.device_get(self.program.eval_step(params,
                                                                self.program.to_global(b)))
            weight += float(w)
            for key, value in {"loss": s, **extra}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        results = {k: v / max(weight, 1.0) for k, v in sums.items()}
        if self.score is not None:
            predict = self.program.predict_step
            results.update(self.score(step, lambda b: np.asarray(jax.device_get(
                predict(params, self.program.to_global(b))))))
        return results


def batch_units(batch: dict) -> int:
    """What throughput counts in a host batch: real tokens, or examples when there is no mask."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(len(next(iter(batch.values()))))


def _log_train(log: metrics.RunLog, step: int, stats, program: Program, ckpt) -> None:
    """Log a step's stats; a non-finite loss stops the run. Checked before every save, so a
    checkpoint never holds non-finite params."""
    stats = jax.device_get(stats)
    loss = float(stats["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at step {step}; the last good checkpoint is step "
            f"{ckpt.latest_step()}; lower optim.lr or raise optim.warmup_steps")
    log.train(step, loss, float(program.lr_schedule(step - 1)), stats)


def _save(ckpt, config: ConfigDict, state: TrainState, step: int, force: bool,
          train_iter) -> None:
    ckpt.save(step, state.params, state.opt_state,
              {"rng": np.asarray(state.rng).tolist(), "step": step,
               "data": {"task": config.data.task, "batches_consumed": step}}, force=force,
              data_state=data_state(train_iter, step))


def _run(config: ConfigDict, workdir: str, program: Program, state: TrainState, compiled,
         train_iter: Iterator[dict], raw_train, evaluate: Evaluator, ckpt, cost: dict,
         start: Optional[int], stop_step: Optional[int] = None,
         grow: Optional[Callable] = None, eval_first: bool = False) -> dict:
    """Train from `state` to `stop_step` (default `config.train.steps`), evaluating, logging
    and checkpointing (with `raw_train`'s input position, the source's iterator under
    `train_iter`). At a growth stop (< steps) the small state is evaluated, not saved, and
    `grow(state, step, log)` saves the grown one; a run resumed at a growth step
    (`eval_first`) evaluates the grown model first."""
    t = config.train
    stop_step = t.steps if stop_step is None else stop_step
    step = int(state.step)
    log = metrics.RunLog(workdir, step, t.steps, cost["flops"], t.peak_flops_per_device)
    print(f"workdir: {workdir}", flush=True)
    print(f"model: {config.model.name} ({checkpointing.param_count(state.params):,} params), "
          f"{'resuming from step ' + str(step) if start is not None else 'fresh start'}, "
          f"training to step {t.steps}", flush=True)
    if config.optim.freeze:
        print(_trainable_line(config, state), flush=True)
    if (start is None and t.eval_at_start) or eval_first:
        log.eval(step, evaluate(state.params, step))
    profiler = metrics.Profiler(fs.join(workdir, "profile"), t.profile_start_step,
                                t.profile_num_steps)
    t_start, preempted, stop = time.perf_counter(), False, metrics.StopSignal()
    try:
        while step < stop_step:
            profiler.before(step)
            batch = next(train_iter)
            state, stats = compiled(state, program.to_global(batch))
            step += 1
            log.count(batch_units(batch))
            profiler.after(step, stats)
            preempted = stop.received or (
                jax.process_count() > 1 and ckpt.reached_preemption(step) and "preemption")
            growing = step == stop_step < t.steps and not preempted
            saving = (step % t.checkpoint_every == 0 or step == t.steps or preempted
                      ) and not growing
            if step % t.log_every == 0 or saving:
                _log_train(log, step, stats, program, ckpt)
            else:
                log.quiet(step)
            if step % t.eval_every == 0 or step == t.steps or growing:
                log.eval(step, evaluate(state.params, step))
            if growing:
                grow(state, step, log)
            if saving:
                _save(ckpt, config, state, step, step == t.steps or bool(preempted),
                      raw_train)
            if preempted:
                log.write(f"stopping at step {step} on {stop.received}; checkpoint saved, "
                          "rerun the same command to resume")
                break
    finally:
        profiler.close()
        stop.restore()
        ckpt.wait()
        ckpt.close()
        log.close()
    return _report(workdir, log, step, bool(preempted), time.perf_counter() - t_start)


def _trainable_line(config: ConfigDict, state: TrainState) -> str:
    """How many parameters the freeze mask leaves trainable, and the optimizer state's size
    (frozen leaves hold none)."""
    mask = optim.trainable_mask(config.optim, state.params)
    n = checkpointing.param_count(state.params)
    n_train = sum(int(np.prod(x.shape)) for x, keep in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(mask)) if keep)
    return (f"trainable: {n_train:,} of {n:,} params ({100 * n_train / n:.4g}%); optimizer "
            f"state: {checkpointing.param_count(state.opt_state):,} numbers")


def _report(workdir: str, log: metrics.RunLog, step: int, preempted: bool,
            elapsed: float) -> dict:
    """The run's summary (returned to the caller) and its closing line."""
    summary = {"workdir": workdir, "steps": step, "preempted": preempted,
               "elapsed_sec": round(elapsed, 1), "tokens": log.tokens,
               "eval_loss": log.eval_loss, "eval_metrics": log.eval_metrics,
               "train_loss": log.train_loss,
               "checkpoints": checkpointing.Checkpointer(workdir).all_steps()}
    print(f"{log.closing_line(step, elapsed)}; checkpoints {summary['checkpoints']} in "
          f"{workdir}", flush=True)
    return summary


def _dry_run(config: ConfigDict, program: Program, batch: dict, cost: dict) -> dict:
    """Print what one step needs per device, then stop without training or writing."""
    n_params = checkpointing.param_count(program.abstract_params)
    rows = next(iter(batch.values())).shape[0]
    tokens = (batch["input_ids"].size if "input_ids" in batch else rows) * jax.process_count()
    mesh = program.mesh
    lines = [
        f"dry run: {config.model.name} ({n_params:,} params), mesh "
        f"{dict(zip(mesh.axis_names, mesh.devices.shape))} on {jax.device_count()} "
        f"{jax.devices()[0].device_kind} device(s), global batch {tokens:,} tokens",
        f"  FLOPs per step per device: {cost['flops']:.4g}"
        f" ({cost['flops'] * jax.device_count() / tokens:.4g} per token, all devices;"
        " counted over the step's jaxpr, loops times their trip counts: TFLOP/s and MFU use it)",
    ]
    if abs(cost["xla_flops"] - cost["flops"]) > 0.05 * cost["flops"]:
        lines.append(f"  XLA's cost analysis: {cost['xla_flops']:.4g} per device "
                     f"({cost['xla_flops'] / cost['flops'] - 1:+.1%}; it counts each loop "
                     "body once)")
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"):
        if key in cost:
            lines.append(f"  {key.replace('_', ' ')} per device: {cost[key] / 2**30:.3f} GiB")
    if "peak_bytes" in cost:
        lines.append(f"  estimated peak memory per device: {cost['peak_bytes'] / 2**30:.3f} GiB")
    table, state_bytes = state_bytes_table(program)
    print("\n".join(lines + table), flush=True)
    return {"dry_run": True, "params": n_params, "tokens_per_step": tokens, **cost,
            **state_bytes}


def state_bytes_table(program: Program) -> tuple[list[str], dict]:
    """Lines of a table of the params' and optimizer state's bytes, in all and per device
    (from the shardings alone), and the same numbers as {"<part>_bytes": (total, per device)}."""
    parts = {"params": program.abstract_params, "opt_state": program.abstract_opt}
    sizes = {k: partitioning.bytes_per_device(v) for k, v in parts.items()}
    sizes["both"] = tuple(map(sum, zip(*sizes.values())))
    lines = [f"  {'state':<10} {'total GiB':>10} {'per device GiB':>15} {'total/per device':>17}"]
    for name, (total, per_device) in sizes.items():
        lines.append(f"  {name:<10} {total / 2**30:>10.3f} {per_device / 2**30:>15.3f} "
                     f"{total / max(per_device, 1):>17.2f}")
    return lines, {f"{k}_bytes": v for k, v in sizes.items()}
