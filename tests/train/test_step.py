"""Train-step invariants: accumulation == big batch, NaN guard, SIGTERM checkpoint-and-exit."""

import functools
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.data import registry, seqio_source
from bigs_jax.train import loop, step
from bigs_jax.train.objectives import mlm
from tests.runs import ROOT, smoke


def test_grad_accumulation_equals_one_big_batch():
    # One narrow layer: the invariant does not depend on depth, the compile time does.
    model = bigs_jax.create("bigs-tiny", vocab_size=50, dropout=0.0, max_len=16, num_layers=1,
                            hidden_size=32, intermediate_size=64)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # Plain SGD with lr 1: the update is the gradient itself, so this compares gradients.
    # (Adam's first step divides by |g| and would amplify round-off of near-zero gradients.)
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 50, (8, 16)), "attention_mask": np.ones((8, 16), int),
             "token_type_ids": np.zeros((8, 16), int), "labels": rng.integers(5, 50, (8, 16)),
             "loss_weights": (rng.random((8, 16)) < 0.3).astype(np.float32)}
    batch["attention_mask"][3, 9:] = 0  # uneven weights per microbatch
    batch["loss_weights"][3, 9:] = 0
    init = step.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
    loss_fn = functools.partial(mlm, max_predictions=0)
    outs = {}
    for k in (1, 4):
        fn = jax.jit(step.make_train_step(graphdef, tx, loss_fn, grad_accum_steps=k))
        outs[k] = fn(init, batch)
    np.testing.assert_allclose(outs[4][1]["loss"], outs[1][1]["loss"], rtol=1e-6)
    grads = {k: jax.tree.map(lambda p, q: np.asarray(p) - np.asarray(q), params,
                             outs[k][0].params) for k in (1, 4)}
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads[1]))
    assert scale > 1e-3  # not vacuous
    err = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(grads[4]),
                                                   jax.tree.leaves(grads[1])))
    assert err <= 1e-5 * scale, (err, scale)


class _NanAtBatch:
    """The SeqIO source with batch `index` (0-based) poisoned: NaN loss weights make that
    step's loss and gradients NaN, as a diverging run's would be."""

    def __init__(self, config, index=4):
        self.inner, self.index = seqio_source.SeqioSource(config), index

    def model_overrides(self):
        return self.inner.model_overrides()

    def iterators(self, start_step):
        train, evals = self.inner.iterators(start_step)

        def poisoned():
            for i, batch in enumerate(train, start_step):
                if i == self.index:
                    batch = {**batch, "loss_weights": np.full_like(batch["loss_weights"],
                                                                   np.nan)}
                yield batch

        return poisoned(), evals


registry.register("nan_at_batch_4", _NanAtBatch)


def test_nan_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    config = smoke(8)
    config.data.source = "nan_at_batch_4"  # step 5 trains on batch 4
    config.train.log_every = 1
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"at step 5; the last good checkpoint is step 4"):
        loop.train_and_evaluate(config, workdir)
    model = bigs_jax.load(workdir)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    from bigs_jax.train.checkpointing import Checkpointer

    assert Checkpointer(workdir).all_steps() == [2, 4]


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/quickstart.py:smoke",
         f"--workdir={workdir}", "--config.train.steps=100000",
         "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000",
         "--config.train.log_every=1",
         # tests.runs.smoke's schedule: the in-process smoke runs have compiled this step
         # already (the session's compilation cache, see conftest.py)
         "--config.optim.schedule=constant", "--config.optim.warmup_steps=0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline and "loss=" not in seen and proc.poll() is None:
        seen += proc.stdout.read1(4096).decode()  # the bar shows loss= once steps run
    time.sleep(2)  # a few steps into training
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert time.time() - t0 < 60
    assert proc.returncode == 0, (seen + out)[-2000:]
    assert "stopping at step" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    from bigs_jax.train.checkpointing import Checkpointer

    assert Checkpointer(str(workdir)).all_steps() == [stopped] and stopped > 1
