"""What a run reports: TensorBoard event files, the progress bar, throughput, FLOPs and MFU.

`RunLog` is the train loop's one reporter: train scalars (loss, lr, grad norm, tokens/s,
TFLOP/s, MFU), eval results, the loss histories of the run's summary and its closing line.
Data sources that score the model themselves (GLUE, SCROLLS, FPT) keep each evaluated step's
scores in `<scores_dir>/dev/step_N.json` (`write_scores`, `read_scores`), so a resumed run
keeps the evaluations made before it was interrupted.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Mapping, Optional

import jax
from clu import metric_writers
from tqdm import tqdm

from bigs_jax import fs
from bigs_jax.train import flops


def writer(logdir: str) -> metric_writers.MetricWriter:
    """TensorBoard writer on the first process; log-only elsewhere."""
    return metric_writers.create_default_writer(
        logdir, just_logging=jax.process_index() > 0, asynchronous=True)


class Progress:
    """A tqdm bar over training steps showing loss, tokens/s and the ETA."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not enabled or jax.process_index() > 0, file=sys.stdout,
                        mininterval=1.0, smoothing=0.1)
        self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, step: int, tokens: int, postfix: Mapping[str, float]) -> None:
        self.tokens += tokens
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                              for k, v in postfix.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, line: str) -> None:
        if jax.process_index() == 0:
            self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Tokens/s and step time over the steps since the last `read`."""

    def __init__(self):
        self.tokens, self.steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def read(self) -> Optional[dict]:
        if not self.steps:
            return None
        dt = time.perf_counter() - self.t0
        out = {"tokens_per_sec": self.tokens / dt, "step_time": dt / self.steps}
        self.tokens, self.steps, self.t0 = 0, 0, time.perf_counter()
        return out


# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(override: float = 0.0) -> float:
    """Peak FLOP/s of one device: the config's value, else the table, else 0 (unknown)."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)


def step_cost(traced, compiled, num_devices: int) -> dict:
    """FLOPs and memory of one step, per device.

    `flops` is counted over the step's jaxpr (`flops.count`: every loop body times its trip
    count) and shared evenly by the `num_devices` the step runs on, which is what TFLOP/s and
    MFU use; `xla_flops` is XLA's own count for one device, which counts each while-loop body
    once (blocked attention, gradient accumulation and scanned layers are undercounted);
    `uncounted_loops` names each while loop the jaxpr count could only count once. Memory
    comes from XLA's analysis.

    Args:
      traced: the step's `jax.stages.Traced` (`jitted.trace(*args)`).
      compiled: `traced.lower().compile()`.
      num_devices: the devices of the step's mesh.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    counted = flops.count(traced.jaxpr)
    out = {"flops": counted.flops / num_devices,
           "xla_flops": float((analysis or {}).get("flops", 0.0)),
           "uncounted_loops": counted.uncounted_loops}
    memory = compiled.memory_analysis()
    if memory is not None:
        out.update({
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
            "generated_code_bytes": memory.generated_code_size_in_bytes,
        })
        # Donated inputs alias outputs, so they are not counted twice.
        out["peak_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return out


class StopSignal:
    """Catches SIGTERM/SIGINT so the loop can checkpoint the current step and exit cleanly.

    Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM before killing a job.
    `received` holds the signal's name once one arrived; a second Ctrl-C exits at once.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: Optional[str] = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the host program
                pass

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Profiler:
    """A jax.profiler trace of steps [start, start + num) into `logdir` (start 0: off).

    Open it with TensorBoard's profile plugin or Perfetto.
    """

    def __init__(self, logdir: str, start: int, num: int):
        self.logdir, self.start, self.stop = logdir, int(start), int(start) + int(num)
        self.active = False

    def before(self, step: int) -> None:
        """Called before running step `step + 1`."""
        if self.start and step + 1 == self.start and jax.process_index() == 0:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(outputs)  # the trace must hold the last step's device work
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class RunLog:
    """The train loop's reporting: TensorBoard scalars, the bar, loss histories, throughput.

    Args:
      workdir: event files go to `workdir/tb`.
      start, total: the first and last step of this run (the bar's range).
      flops: FLOPs of one step per device (`step_cost`), for TFLOP/s and MFU.
      peak_flops_override: `config.train.peak_flops_per_device` (0: look it up).
    """

    def __init__(self, workdir: str, start: int, total: int, flops: float,
                 peak_flops_override: float = 0.0):
        self.writer = writer(fs.join(workdir, "tb"))
        self.bar = Progress(start, total)
        self.meter = Throughput()
        self.flops = flops
        self.peak = peak_flops(peak_flops_override)
        self.tokens = self._last_tokens = 0
        self.train_loss: dict[int, float] = {}
        self.eval_loss: dict[int, float] = {}
        self.eval_metrics: dict[int, dict] = {}

    def count(self, tokens: int) -> None:
        """One more step of `tokens` units (tokens, or examples for unmasked batches)."""
        self.meter.add(tokens)
        self.tokens += tokens
        self._last_tokens = tokens

    def train(self, step: int, loss: float, lr: float, stats: Mapping[str, float]) -> None:
        """Log step `step`'s train loss, learning rate, gradient norm and throughput."""
        self.train_loss[step] = loss
        scalars = {"train/loss": loss, "train/lr": lr}
        if "grad_norm" in stats:
            scalars["train/grad_norm"] = float(stats["grad_norm"])
        rate = self.meter.read()
        if rate:
            scalars.update({"perf/tokens_per_sec": rate["tokens_per_sec"],
                            "perf/step_time": rate["step_time"],
                            "perf/tflops_per_device": self.flops / rate["step_time"] / 1e12})
            if self.peak:
                scalars["perf/mfu"] = self.flops / rate["step_time"] / self.peak
        self.writer.write_scalars(step, scalars)
        self.bar.update(step, self._last_tokens, {"loss": loss, "tok/s": round(
            scalars.get("perf/tokens_per_sec", 0.0))})

    def quiet(self, step: int) -> None:
        """Advance the bar over a step that is not logged."""
        self.bar.update(step, self._last_tokens, {})

    def eval(self, step: int, results: Mapping[str, float]) -> None:
        """Log an evaluation: {"loss": ..., and whatever else the objective or source scores}."""
        self.eval_loss[step], self.eval_metrics[step] = results["loss"], dict(results)
        self.writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        self.bar.write(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}"
                                                    for k, v in results.items()))

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()

    def closing_line(self, step: int, elapsed: float) -> str:
        """'done: N steps in Ts, eval loss a -> b (x% lower)'."""
        first, last = self.eval_loss.get(0), self.eval_loss.get(step)
        line = f"done: {step} steps in {elapsed:.0f}s"
        if first is not None and last is not None:
            line += (f", eval loss {first:.3f} -> {last:.3f} "
                     f"({100 * (1 - last / first):.1f}% lower)")
        elif last is not None:
            line += f", eval loss {last:.3f}"
        return line


# ---------------------------------------------------------------------------- dev scores


def write_scores(scores_dir: str, step: int, scores: dict, predictions: dict) -> None:
    """Save one evaluation as `<scores_dir>/dev/step_N.json` (first process; no-op without a
    scores_dir)."""
    if not scores_dir or jax.process_index() != 0:
        return
    fs.makedirs(fs.join(scores_dir, "dev"))
    fs.write_json(fs.join(scores_dir, "dev", f"step_{step}.json"),
                      {"step": step, "scores": scores, "predictions": predictions})


def read_scores(scores_dir: str) -> dict[int, dict]:
    """{step: {"scores": ..., "predictions": ...}} of every evaluation written so far."""
    out = {}
    for path in fs.glob(fs.join(scores_dir, "dev", "step_*.json")):
        data = fs.read_json(path)
        out[int(data["step"])] = data
    return out
