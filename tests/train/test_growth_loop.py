"""A growth schedule inside a train run: the loss across the growth step, the grown workdir,
exact resume after growth (also after SIGKILL), and a sharded mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import bigs_jax
from bigs_jax.train import checkpointing, loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402
from tests.runs import params_of  # noqa: E402
from tests.train.test_damaged import truncate_largest  # noqa: E402

GROWTH = [{"step": 3, "hidden_size": 128, "num_layers": 3, "intermediate_size": 256,
           "ssm_state": 24}]


def grown_run(steps: int):
    config = quickstart.get_config("smoke")  # BiGS: hidden 64, 2 layers, F 128, N 16
    config.train.steps = steps
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 4
    config.train.eval_every = 3
    config.train.log_every = 1
    config.growth = json.dumps(GROWTH)
    return config


def rewarm_run():
    """grown_run(5) with the growth's lr re-warmed over 2 steps."""
    config = grown_run(5)
    config.growth = json.dumps([{**GROWTH[0], "rewarm_steps": 2}])
    return config


@pytest.fixture(scope="module")
def grown5(tmp_path_factory):
    """(workdir, summary) of rewarm_run(): checkpoints 2 (base model), 3 (grown), 4, 5."""
    workdir = str(tmp_path_factory.mktemp("grown5") / "run")
    return workdir, loop.train_and_evaluate(rewarm_run(), workdir)


@pytest.mark.slow  # with the grown5 run (~30-40 s on 2 cores)
def test_growth_schedule_in_a_train_run(grown5):
    workdir, summary = grown5
    before, after = summary["growth"][3]["eval_loss_before"], summary["growth"][3][
        "eval_loss_after"]
    print(f"eval loss at the growth step: before {before:.7f}, after {after:.7f}")
    assert abs(before - after) < 1e-5
    assert summary["eval_loss"][5] < summary["eval_loss"][3] < summary["eval_loss"][0]
    assert summary["steps"] == 5 and summary["checkpoints"] == [2, 3, 4, 5]
    grown = checkpointing.read_model_config(workdir)
    assert (grown.hidden_size, grown.num_layers, grown.intermediate_size,
            grown.ssm_state) == (128, 3, 256, 24)
    assert bigs_jax.load(workdir).config == grown  # the grown workdir loads like any other


@pytest.mark.slow  # a second grown run (~23 s); test_damaged.py covers damaged steps in one stage
def test_damaged_grown_steps_resume_in_the_stage_before_growth(grown5, tmp_path, capsys):
    """Every step saved after growth (3, 4, 5) damaged: the run resumes from step 2 in the base
    model's stage (not restoring step 2 onto the grown model and calling it damaged too), sets
    3-5 aside, grows again at 3 and ends with the uninterrupted run's parameters."""
    workdir = str(tmp_path / "run")
    shutil.copytree(grown5[0], workdir)
    for step in (3, 4, 5):
        truncate_largest(os.path.join(workdir, "checkpoints", str(step)))
    summary = loop.train_and_evaluate(rewarm_run(), workdir)
    out = capsys.readouterr().out
    for step in (5, 4, 3):
        assert (f"warning: checkpoint step {step} is damaged (its files cannot be read (" in out
                and "resuming from an earlier growth stage" in out), out
    assert sorted(os.listdir(os.path.join(workdir, checkpointing.DAMAGED))) == ["3", "4", "5"]
    assert summary["checkpoints"] == [2, 3, 4, 5]
    for a, b in zip(params_of(workdir), params_of(grown5[0])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # with the grown5 run (~30-40 s on 2 cores)
def test_rewarm_steps_ramp_the_logged_lr_after_growth(grown5):
    lr = _scalars(grown5[0], "train/lr")
    peak = rewarm_run().optim.lr
    np.testing.assert_allclose([lr[s] for s in (2, 3, 4, 5)], [peak, peak, peak / 2, peak],
                               rtol=1e-6)


@pytest.mark.slow
def test_growth_run_stopped_after_growth_resumes_exactly(tmp_path):
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(grown_run(6), workdir)
    assert summary["eval_loss"][6] < summary["eval_loss"][3]  # keeps falling after growth

    # Stopped after the growth step and continued: the same losses, bit for bit.
    split = str(tmp_path / "split")
    loop.train_and_evaluate(grown_run(4), split)
    resumed = loop.train_and_evaluate(grown_run(6), split)
    for s in (5, 6):
        assert resumed["train_loss"][s] == summary["train_loss"][s]
    assert resumed["eval_loss"][6] == summary["eval_loss"][6]


def test_a_short_growth_run_keeps_its_loss_and_trains_on(tmp_path):
    """The default suite's run of a growth schedule inside the train loop (the grown5 tests
    are slow): 3 steps, deeper and wider at step 2 with the stacked optimizer update."""
    config = grown_run(3)
    config.growth = json.dumps([{"step": 2, "num_layers": 3, "intermediate_size": 192}])
    config.train.update(eval_every=2, checkpoint_every=2, stacked_update=True)
    config.model.scan_layers = True
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(config, workdir)
    growth = summary["growth"][2]
    assert abs(growth["eval_loss_before"] - growth["eval_loss_after"]) < 1e-5
    assert summary["eval_loss"][3] < summary["eval_loss"][2] < summary["eval_loss"][0]
    assert summary["checkpoints"] == [2, 3]
    grown = checkpointing.read_model_config(workdir)
    assert (grown.num_layers, grown.intermediate_size) == (3, 192)


def test_bad_schedules_fail_in_one_line(tmp_path):
    config = grown_run(6)
    config.growth = '[{"step": 3, "hidden": 128}]'
    with pytest.raises(loop.ConfigError, match="unknown keys"):
        loop.train_and_evaluate(config, str(tmp_path / "a"))
    config.growth = '[{"step": 3, "hidden_size": 128, "rewarm_steps": -1}]'
    with pytest.raises(loop.ConfigError, match="rewarm_steps must be >= 0"):
        loop.train_and_evaluate(config, str(tmp_path / "c"))
    config.growth = '[{"step": 3, "hidden_size": 100}]'
    with pytest.raises(loop.ConfigError, match="multiple of 64"):
        loop.train_and_evaluate(config, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / "checkpoints" / "3")


def _train_py(workdir, steps, extra=()):
    args = [sys.executable, "train.py", "--config=configs/quickstart.py:smoke",
            f"--workdir={workdir}", f"--config.train.steps={steps}",
            "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=3",
            "--config.train.log_every=1", f"--config.growth={json.dumps(GROWTH)}", *extra]
    return args


def _losses(workdir):
    return _scalars(workdir, "train/loss")


def _scalars(workdir, tag):
    from tensorboard.backend.event_processing import event_accumulator

    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in acc.Tensors(tag)}


@pytest.mark.slow
def test_sigkill_after_growth_then_rerun_gives_the_same_losses(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_train_py(straight, 8), cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=900)
    proc = subprocess.Popen(_train_py(killed, 8), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    grown_step = os.path.join(killed, "checkpoints", "3")  # the grown state's checkpoint
    deadline = time.time() + 600
    while not os.path.exists(grown_step) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(_train_py(killed, 8), cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=900)
    assert checkpointing.read_model_config(killed).hidden_size == 128
    a, b = _losses(straight), _losses(killed)
    for s in range(5, 9):
        assert a[s] == b[s], (s, a[s], b[s])


MESH_SCRIPT = """
import json, sys
from bigs_jax.train import loop
from configs import quickstart
from tests.train.test_growth_loop import grown_run
config = grown_run(5)
config.mesh.shape = tuple(int(x) for x in sys.argv[1].split(","))
config.mesh.rules = [list(r) for r in config.mesh.rules]
s = loop.train_and_evaluate(config, sys.argv[2])
print(json.dumps({"losses": [s["train_loss"][k] for k in sorted(s["train_loss"])],
                  "growth": s["growth"][3]}))
"""


@pytest.mark.slow
def test_growth_on_a_sharded_mesh(tmp_path):
    """Growth on a (data 2, fsdp 2, tensor 1) mesh of 4 forced CPU devices: the losses of the
    single-device run."""
    out = {}
    for mesh, devices in (("1,1,1", 1), ("2,2,1", 4)):
        env = dict(os.environ, PYTHONPATH=ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, mesh,
                            str(tmp_path / mesh.replace(",", "x"))], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        out[mesh] = json.loads(r.stdout.strip().splitlines()[-1])
    g = out["2,2,1"]["growth"]
    assert abs(g["eval_loss_before"] - g["eval_loss_after"]) < 1e-5
    np.testing.assert_allclose(out["2,2,1"]["losses"], out["1,1,1"]["losses"], rtol=1e-5)
