"""TensorBoard event files, the progress bar, and throughput accounting."""

from __future__ import annotations

import signal
import sys
import time
from typing import Mapping, Optional

import jax
from clu import metric_writers
from tqdm import tqdm


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


def step_cost(compiled) -> dict:
    """FLOPs and memory of one compiled step, per device, from XLA's own analyses."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    out = {"flops": float((analysis or {}).get("flops", 0.0))}
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
