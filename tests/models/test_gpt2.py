"""GPT-2 invariants: exact causality, padding independence, sizes, and training end to end."""

import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.train import loop

from configs import gpt2 as gpt2_configs
from tests.runs import ROOT

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_len=24)


def test_causal_exactly():
    """d logits[t] / d inputs_embeds[s] is exactly 0 for every s > t, and non-zero for s <= t."""
    graphdef, state = nnx.split(bigs_jax.create("gpt2-tiny", **TINY))
    L = 12
    x_BLD = jax.random.normal(jax.random.key(0), (1, L, TINY["hidden_size"]))
    w_C = jax.random.normal(jax.random.key(1), (TINY["vocab_size"],))

    def grad_at(t):  # one compiled program for every t
        f = lambda x: nnx.merge(graphdef, state)(inputs_embeds=x).logits[0, t] @ w_C  # noqa
        return jax.grad(f)(x_BLD)[0]

    g_TLD = jax.jit(jax.vmap(grad_at))(jnp.arange(L))
    for t, g_LD in enumerate(np.asarray(g_TLD)):
        g_L = np.abs(g_LD).sum(-1)
        assert np.all(g_L[t + 1:] == 0.0), (t, g_L)
        assert np.all(g_L[: t + 1] > 0), (t, g_L)


def test_padding_independence(jitted):
    """A right-padded batch gives, on real tokens, the logits of each example alone."""
    model = jitted(bigs_jax.create("gpt2-tiny", **TINY))
    lengths, pad_to = [5, 24, 1, 13], 24
    rng = np.random.default_rng(0)
    mask = (np.arange(pad_to)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1, 97, (len(lengths), pad_to)), 0)
    batched = np.asarray(model(ids, mask).logits)
    for b, n in enumerate(lengths):
        alone = np.asarray(model(ids[b: b + 1, :n]).logits)[0]
        np.testing.assert_allclose(batched[b, :n], alone, atol=1e-5)


def test_inputs_embeds_equals_ids():
    model = bigs_jax.create("gpt2-tiny", **TINY)
    ids = np.random.default_rng(1).integers(0, 97, (2, 10))
    x_BLD = model.embeddings.word(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(model(ids).logits),
                                  np.asarray(model(inputs_embeds=x_BLD).logits))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=x_BLD)


def test_openai_sizes_and_untied_head():
    """Parameter counts of the HF checkpoints: gpt2 124,439,808, gpt2-medium 354,823,168."""
    count = lambda name, **kw: bigs_jax.count_params(  # noqa: E731
        nnx.eval_shape(lambda: bigs_jax.create(name, **kw)))
    assert count("gpt2") == 124_439_808
    assert count("gpt2-medium") == 354_823_168
    assert count("gpt2", tie_word_embeddings=False) == 124_439_808 + 50257 * 768
    untied = bigs_jax.create("gpt2-tiny", tie_word_embeddings=False, **TINY)
    assert untied.lm_head.kernel.shape == (32, 97)
    assert bigs_jax.create("gpt2-tiny", intermediate_size=40, **TINY).layers[0].mlp.up \
        .kernel.shape == (32, 40)


def test_residual_projections_use_scaled_init():
    # 12 layers (the 1/sqrt(2·12) scale) at width 256: a 256×256 kernel estimates its std to
    # ~0.3%, and the init is a fraction of GPT-2 small's 85M numbers
    model = bigs_jax.create("gpt2", num_layers=12, hidden_size=256, num_heads=4,
                            intermediate_size=1024, vocab_size=256, max_len=16)
    block = model.layers[0]
    std = lambda p: float(np.asarray(p[...]).std())  # noqa: E731
    assert abs(std(block.mixer.query.kernel) - 0.02) < 1e-3
    assert abs(std(block.mixer.out.kernel) - 0.02 / np.sqrt(24)) < 2e-4
    assert abs(std(block.mlp.down.kernel) - 0.02 / np.sqrt(24)) < 2e-4


def test_dropout_only_when_training():
    model = bigs_jax.create("gpt2-tiny", dropout=0.5, attention_dropout=0.5, **TINY)
    ids = np.random.default_rng(2).integers(0, 97, (2, 10))
    a = np.asarray(model(ids).logits)
    np.testing.assert_array_equal(a, np.asarray(model(ids).logits))
    b = np.asarray(model(ids, deterministic=False, rngs=nnx.Rngs(dropout=0)).logits)
    assert np.abs(a - b).max() > 1e-3


def test_jit_equals_eager():
    model = bigs_jax.create("gpt2-tiny", **TINY)
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(3).integers(0, 97, (2, 10))
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)(state, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids).logits), atol=1e-5)


def test_smoke_config_trains(tmp_path):
    """configs/gpt2.py:smoke through the trainer: the causal-LM loss falls, checkpoints load."""
    summary = loop.train_and_evaluate(gpt2_configs.get_config("smoke"), str(tmp_path / "run"))
    assert summary["steps"] == 6 and summary["checkpoints"] == [3, 6]
    assert summary["eval_loss"][6] < summary["eval_loss"][0]
    model = bigs_jax.load(str(tmp_path / "run"))
    assert model.config.num_layers == 2 and model.config.max_len == 128


@pytest.mark.slow
def test_train_py_gpt2_mini_loss_falls_30_percent(tmp_path):
    """`python train.py --config=configs/gpt2.py:size=mini`: eval loss -30% in <= 10 minutes."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "train.py", "--config=configs/gpt2.py:size=mini",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"eval loss ([\d.]+) -> ([\d.]+) \(([\d.]+)% lower\)", run.stdout)
    assert m, run.stdout[-2000:]
    print(f"gpt2-mini: eval loss {m[1]} -> {m[2]} ({m[3]}% lower) in {elapsed:.0f}s")
    assert float(m[3]) >= 30 and elapsed <= 600
