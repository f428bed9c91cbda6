"""The causal gated-SSM LM: exact sizes, strict causality of the parallel path, the SSM modes
agree, padding and packing change nothing, and recurrent decoding (prefill state + one step per
token) gives the parallel forward's logits at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.layers.embeddings import PAD_LOGIT
from bigs_jax.models import make_config
from bigs_jax.train import loop
from configs import bigs_lm as bigs_lm_configs

V, L = 97, 32


def _tiny(**overrides):
    return bigs_jax.create("bigs-lm-tiny", vocab_size=V, max_len=64, seed=1, **overrides)


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def test_param_counts_exact():
    for name in ("bigs-lm-tiny", "bigs-lm-small"):
        c = make_config(name)
        D, F, N, C = c.hidden_size, c.intermediate_size, c.ssm_state, c.vocab_size
        layer = 2 * D + 2 * (D * F + F) + 2 * (D * D + D) + (F * D + D) + (4 * N + 2)
        want = C * D + c.num_layers * layer + 2 * D
        model = nnx.eval_shape(lambda name=name: bigs_jax.create(name))
        assert bigs_jax.count_params(model) == want, name
    # untied: one more C x D projection, no bias
    untied = nnx.eval_shape(lambda: bigs_jax.create("bigs-lm-tiny", tie_word_embeddings=False))
    tied = nnx.eval_shape(lambda: bigs_jax.create("bigs-lm-tiny"))
    assert bigs_jax.count_params(untied) - bigs_jax.count_params(tied) == 50257 * 64


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocabulary_keeps_the_logits_and_masks_the_pad_rows(jitted, tied):
    """vocab_multiple=128 (pretraining configs): the table and head get 128 - 97 more rows;
    with the unpadded model's weights in the first rows, the real logits are equal and every
    pad logit is PAD_LOGIT, so neither the loss nor generation can pick a pad id."""
    small = _tiny(tie_word_embeddings=tied)
    padded = _tiny(tie_word_embeddings=tied, vocab_multiple=128)
    table = np.array(padded.embeddings.word.embedding[...])
    assert table.shape == (128, 64)
    table[:V] = small.embeddings.word.embedding[...]
    padded.embeddings.word.embedding[...] = table
    if not tied:
        kernel = np.array(padded.lm_head.kernel[...])
        kernel[:, :V] = small.lm_head.kernel[...]
        padded.lm_head.kernel[...] = kernel
    ids = _ids((2, L))
    want, got = jitted(small)(ids).logits, jitted(padded)(ids).logits
    assert got.shape == (2, L, 128)
    np.testing.assert_array_equal(np.asarray(got[..., V:]), PAD_LOGIT)
    np.testing.assert_allclose(got[..., :V], want, atol=1e-6, rtol=0)
    out = np.asarray(bigs_jax.generate(padded, ids[:, :4], max_new_tokens=6))
    np.testing.assert_array_equal(out, bigs_jax.generate(small, ids[:, :4], max_new_tokens=6))
    with pytest.raises(ValueError, match="vocab_multiple must be >= 1"):
        _tiny(vocab_multiple=0)


@pytest.mark.parametrize("mode", ["toeplitz", "fft"])
def test_future_tokens_leave_the_past_unchanged(jitted, mode):
    """Changing tokens t+1.. leaves every output at <= t unchanged (exactly for the Toeplitz
    path; within FFT round-off, 1e-6 of the logits' scale, for the FFT), and does change the
    outputs after t."""
    forward = jitted(_tiny(ssm_mode=mode))
    ids = _ids((3, L))
    ts = np.array([0, 9, 30])
    changed = ids.copy()
    for b, t in enumerate(ts):
        changed[b, t + 1:] = (ids[b, t + 1:] + 1 + b) % V
    a, b_ = (np.asarray(forward(x).logits) for x in (ids, changed))
    scale = np.abs(a).max()
    for row, t in enumerate(ts):
        past = np.abs(a[row, :t + 1] - b_[row, :t + 1]).max()
        if mode == "toeplitz":
            assert past == 0.0, (t, past)
        else:
            assert past < 1e-6 * scale, (t, past, scale)
        assert np.abs(a[row, t + 1:] - b_[row, t + 1:]).min(axis=-1).max() > 1e-4 * scale


def test_ssm_modes_agree(jitted):
    ids = _ids((2, L))
    ref = np.asarray(jitted(_tiny(ssm_mode="toeplitz"))(ids).logits)
    for mode in ("fft", "chunked", "scan", "recurrent"):
        got = np.asarray(jitted(_tiny(ssm_mode=mode))(ids).logits)
        np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0, err_msg=mode)


def test_padding_and_packing_change_nothing(jitted):
    """Right pads (holding real ids) change no real output; two examples packed in one row
    (segment ids) give each one's own logits."""
    model = _tiny()
    forward = jitted(model)
    a, b = _ids((1, 12), 1), _ids((1, 20), 2)
    alone_a, alone_b = (np.asarray(forward(x).logits)[0] for x in (a, b))
    padded = np.concatenate([a, _ids((1, 20), 3)], axis=1)
    mask = (np.arange(32) < 12)[None].astype(np.int32)
    np.testing.assert_allclose(np.asarray(forward(padded, mask).logits)[0, :12], alone_a,
                               atol=1e-6, rtol=0)
    row = np.concatenate([a, b], axis=1)
    seg = np.asarray([[1] * 12 + [2] * 20], np.int32)
    pos = np.asarray([list(range(12)) + list(range(20))], np.int32)
    packed = np.asarray(forward(row, np.ones_like(row), segment_ids=seg,
                                positions=pos).logits)[0]
    np.testing.assert_allclose(packed[:12], alone_a, atol=1e-6, rtol=0)
    np.testing.assert_allclose(packed[12:], alone_b, atol=1e-6, rtol=0)


def _decode_all(model, ids, lengths):
    """Prefill row b's first lengths[b] tokens (one right-padded batch), then step every row
    through its next tokens: (B, G, C) logits, row b's at positions lengths[b]-1+g, and the
    final cache."""
    graphdef, state = nnx.split(model)
    B, T = ids.shape

    @jax.jit
    def prefill(state, block, lengths):
        m = nnx.merge(graphdef, state)
        return m.prefill(block, lengths, m.init_cache(B, T))

    @jax.jit
    def step(state, tok, cache):
        m = nnx.merge(graphdef, state)
        return m.decode_step(tok, jnp.zeros((B,), jnp.int32), cache, m.decode_constants(T))

    block = np.where(np.arange(T)[None] < lengths[:, None], ids, 7)  # pads: a real id
    logits, cache = prefill(state, block, lengths)
    out = [np.asarray(logits)]
    for g in range(T - int(lengths.max())):
        logits, cache = step(state, ids[np.arange(B), lengths + g], cache)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), cache


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False, init_std=0.2,
                                                ssm_shared=False, ssm_init="lin")])
def test_recurrent_decoding_equals_parallel_forward(jitted, overrides):
    """float32: recurrent logits = FFT-forward logits to 1e-5 at every position after the
    prompt, for prompts of 1, 4 and 9 tokens prefilled in one batch; the state's size does
    not depend on the context."""
    model = _tiny(**overrides)
    ids = _ids((3, L), 4)
    full = np.asarray(jitted(model)(ids).logits)
    lengths = np.array([1, 4, 9], np.int32)
    got, cache = _decode_all(model, ids, lengths)
    G = got.shape[1]
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b], full[b, n - 1:n - 1 + G], atol=1e-5, rtol=0)
    c = model.config
    assert [x.shape for x in cache] == [(3, c.hidden_size, c.ssm_state)] * c.num_layers
    assert [x.shape for x in model.init_cache(3, 8192)] == [x.shape for x in cache]


def test_recurrent_decoding_is_exact_in_float64(jitted):
    """With float64 parameters and compute the two paths agree to 1e-12: the recurrence and
    the prefill state are the kernel's discretization, not an approximation of it."""
    with jax.enable_x64():
        model = _tiny(dtype="float64", param_dtype="float64", output_dtype="float64")
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), params))  # fs4 too
        ids = _ids((2, L), 5)
        full = np.asarray(jitted(model)(ids).logits)
        assert full.dtype == np.float64
        lengths = np.array([6, 2], np.int32)
        got, _ = _decode_all(model, ids, lengths)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got[b], full[b, n - 1:n - 1 + got.shape[1]],
                                       atol=1e-12, rtol=0)


@pytest.mark.slow  # ~25 s on 2 cores
def test_smoke_config_trains(tmp_path):
    """configs/bigs_lm.py:smoke through the trainer on the causal-LM task: loss falls."""
    summary = loop.train_and_evaluate(bigs_lm_configs.get_config("smoke"), str(tmp_path / "r"))
    assert summary["steps"] == 6 and summary["eval_loss"][6] < summary["eval_loss"][0]
    model = bigs_jax.load(str(tmp_path / "r"))
    assert type(model).__name__ == "BigsLM" and model.config.num_layers == 2
