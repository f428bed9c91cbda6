"""M2-BERT / M2-GPT: exact parameter counts, official key map, padding, direction, causality."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.paths import flat_paths as flatten
from bigs_jax.convert.m2_official import KEY_MAP, official_to_ours
from bigs_jax.layers.longconv import resolve_conv_mode
from bigs_jax.models import make_config
from bigs_jax.models.m2 import M2
from tests.reference.m2_shapes import official_shapes


# (H, I): research/m2.md §2.5. Counts: MLM head included, tied decoder once, no pooler, the
# (128, H) position table included (the released models have it: `position_embeddings`).
SIZES = {"m2-bert-80m": (768, 3072, 80_267_328, 80_285_760),
         "m2-bert-110m": (960, 3840, 115_583_616, 115_606_656),
         "m2-bert-260m": (1536, 6144, 259_133_760, 259_170_624),
         "m2-bert-341m": (1792, 7168, 341_038_144, 341_081_152)}
# The figures quoted in the task brief: the counts above minus the (128, H) position table,
# i.e. `use_positional_encodings: False` (configuration_bert.py's default; every released yaml
# sets it True). `positions=False` builds that model.
BRIEF = {"m2-bert-80m": 80_169_024, "m2-bert-110m": 115_460_736,
         "m2-bert-260m": 258_937_152, "m2-bert-341m": 340_808_768}


def abstract(name, **overrides):
    return nnx.eval_shape(lambda: M2(make_config(name, **overrides), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("positions", [True, False])
@pytest.mark.parametrize("name", list(SIZES))
def test_param_counts_exact_and_key_map_one_to_one(name, positions):
    H, I, count, legacy_count = SIZES[name]
    if not positions:
        count, legacy_count = BRIEF[name], BRIEF[name] + 12 * 2 * H
    for legacy, expected in ((False, count), (True, legacy_count)):
        model = abstract(name, mixer_norm=legacy, positions=positions)
        assert bigs_jax.count_params(model) == expected
        ours = {p: tuple(v.shape) for p, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()}
        official = official_shapes(H, I, 12, legacy=legacy, positions=positions)
        mapped = {}
        for foreign, shape in official.items():
            # buffers, freq aliases, tied decoder: dropped on import
            if any(re.fullmatch(p, foreign) for p in KEY_MAP.ignore):
                continue
            path = official_to_ours(foreign)
            assert path is not None, foreign
            rule = KEY_MAP.ours_of(foreign)[0]
            view = np.broadcast_to(np.zeros((), np.float32), shape)  # no allocation
            assert tuple(rule.transform.to_ours(view).shape) == ours[path], foreign
            assert path not in mapped, (path, foreign, mapped.get(path))
            mapped[path] = foreign
        assert set(mapped) == set(ours)  # one-to-one onto our tree
        ignored = len(official) - len(mapped)
        assert ignored == 2 + 12 * 2 * (2 + 5)  # position_ids, decoder.weight; t, deltas, 5 freq


def _tiny(**overrides):
    H = 32
    cfg = make_config("m2-bert-tiny", hidden_size=H, intermediate_size=64, max_len=24,
                      vocab_size=50, dropout=0.0, init_std=1 / np.sqrt(H), **overrides)
    return M2(cfg, rngs=nnx.Rngs(0))


def test_padding_independence_and_official_mode_differs(jitted):
    rng = np.random.default_rng(0)
    B, L = 3, 24
    lengths = rng.integers(5, L + 1, B)
    ids = rng.integers(1, 50, (B, L))
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    for official, should_match in ((False, True), (True, False)):
        model = jitted(_tiny(official_padding=official))
        h = np.asarray(model(ids, mask).hidden_states)
        errs = []
        for b in range(B):
            n = lengths[b]
            alone = np.asarray(model(ids[b:b + 1, :n], np.ones((1, n))).hidden_states)[0]
            errs.append(np.abs(h[b, :n] - alone).max())
        if should_match:
            assert max(errs) < 1e-5, errs
        else:
            assert max(errs[b] for b in range(B) if lengths[b] < L) > 1e-2, errs


def _layers_fn(model, mask=None):
    # The layers run channel-major, (B, D, L) (M2Config.channel_major)
    def f(x_BLD):
        x_BDL = jnp.swapaxes(x_BLD, 1, 2)
        for layer in model.layers:
            x_BDL = layer(x_BDL, mask)
        return jnp.swapaxes(x_BDL, 1, 2)
    return f


def test_bidirectional_gradients_both_ways():
    model = _tiny()
    x = jax.random.normal(jax.random.key(0), (1, 16, 32))
    t = 7
    # A random readout of position t: the plain sum over channels of a post-LayerNorm output
    # (unit scale, zero bias at init) is constant, and its gradient is round-off (~1e-7).
    w = jax.random.normal(jax.random.key(1), (32,))
    g = jax.jit(jax.grad(lambda x: _layers_fn(model)(x)[0, t] @ w))(x)
    mag = np.abs(np.asarray(g))[0].sum(-1)
    # Every position reaches t both ways; the implicit filters decay with distance, so far
    # positions weigh little at init, while the neighbours on each side weigh O(1).
    assert (mag > 0).all(), mag
    assert min(mag[t - 1], mag[t + 1]) > 1e-2 * mag.max(), mag


@pytest.mark.parametrize("mlp", [True, False])
def test_gpt_causality_exact_toeplitz_bounded_fft(mlp):
    cfg = dict(hidden_size=32, intermediate_size=64, vocab_size=50, max_len=24,
               init_std=1 / np.sqrt(32), mlp=mlp)
    x = jax.random.normal(jax.random.key(1), (1, 16, 32))
    ts = (0, 5, 14)
    for mode in ("toeplitz", "fft"):
        model = M2(make_config("m2-gpt-tiny", conv_mode=mode, **cfg), rngs=nnx.Rngs(0))
        word, f = model.embeddings.word.embedding[...], _layers_fn(model)

        def grad_at(t, f=f, word=word):  # one compiled program for every t
            return jax.grad(lambda x: (f(x)[0, t] @ word.T).sum())(x)[0]

        g_TLD = np.asarray(jax.jit(jax.vmap(grad_at))(jnp.asarray(ts)))
        for t, g in zip(ts, g_TLD):
            past, future = np.abs(g[:t + 1]).max(), np.abs(g[t + 1:]).max()
            assert past > 1e-3
            if mode == "toeplitz":
                assert future == 0.0, (t, future)
            else:  # FFT round-off leaks ~1e-7 of the signal into the future; bounded, not 0
                assert future < 1e-5 * past, (t, future, past)


def test_fft_equals_monarch_equals_toeplitz(jitted):
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 50, (2, 24))
    outs = {m: np.asarray(jitted(_tiny(conv_mode=m))(ids).logits) for m in ("fft", "monarch",
                                                                            "toeplitz")}
    scale = np.abs(outs["fft"]).max()
    assert np.abs(outs["monarch"] - outs["fft"]).max() < 1e-4 * scale
    assert np.abs(outs["toeplitz"] - outs["fft"]).max() < 1e-4 * scale


@pytest.mark.parametrize("name", ["m2-bert-tiny", "m2-gpt-tiny"])
def test_monarch_conv_precisions_equal_fft(jitted, name):
    """The matmul long convolutions (Monarch DFT GEMMs) in the whole model: bf16_3x equals the
    fp32 FFT path within 1e-4 of max |out| on the logits and hidden states (issue 18's
    acceptance; measured 8.0e-6 to 1.1e-5), fp32 within 1e-5 (4.0e-7 to 4.9e-7). The
    default, conv_mode='auto', is bitwise the path it resolves to (fft on CPU)."""
    kw = dict(vocab_size=50, max_len=128, dropout=0.0, seed=0)
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 50, (2, 128))
    mask = (np.arange(128)[None] < np.array([[128], [77]])).astype(np.int32)
    run = lambda **conv: jitted(bigs_jax.create(name, **kw, **conv))(ids, mask)
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max())
    fft = run(conv_mode="fft")
    errs = {}
    for precision in ("fp32", "bf16_3x"):
        out = run(conv_mode="monarch", conv_precision=precision)
        errs[precision] = [rel(getattr(out, k), getattr(fft, k))
                           for k in ("logits", "hidden_states")]
    assert max(errs["fp32"]) < 1e-5 and max(errs["bf16_3x"]) < 1e-4, errs
    want = fft if resolve_conv_mode("auto") == "fft" else run(conv_mode="monarch")
    np.testing.assert_array_equal(np.asarray(run().logits), np.asarray(want.logits))


def test_conv_precision_refusals():
    assert make_config("m2-bert-tiny").conv_mode == "auto"
    with pytest.raises(ValueError, match="unknown conv_precision 'tf32'.*bf16_3x"):
        make_config("m2-bert-tiny", conv_mode="monarch", conv_precision="tf32")
    with pytest.raises(ValueError, match="conv_mode='fft' runs jnp.fft in fp32"):
        make_config("m2-gpt-tiny", conv_mode="fft", conv_precision="bf16")
    with pytest.raises(ValueError, match="conv_mode='fft' runs jnp.fft in fp32"):
        bigs_jax.create("m2-vit-tiny", conv_mode="fft", conv_precision="bf16_3x")


def test_gpt_lm_logits_and_heads(jitted):
    model = jitted(bigs_jax.create("m2-gpt-tiny", vocab_size=50, max_len=32))
    out = model(np.ones((2, 32), np.int32), attention_mask=np.ones((2, 32)))
    assert out.logits.shape == (2, 32, 50) and np.isfinite(np.asarray(out.logits)).all()
    # The pooler head (the retrieval checkpoints): tanh(dense(first token's hidden state)),
    # recomputed here in float64 from the model's own parameters; and with non_padding_mean,
    # the mean over real tokens only.
    ids = np.random.default_rng(4).integers(1, 50, (2, 16))
    mask = np.ones((2, 16), np.int32)
    mask[1, 9:] = 0
    for kind in ("cls", "non_padding_mean"):
        encoder = bigs_jax.create("m2-bert-tiny", head="pooler", pooler=kind, max_len=16,
                                  vocab_size=50, init_std=0.2)
        out = jitted(encoder)(ids, mask)
        h = np.asarray(out.hidden_states, np.float64)
        w = mask[..., None]
        first = h[:, 0] if kind == "cls" else (h * w).sum(1) / w.sum(1)
        kernel, bias = (np.asarray(p[...], np.float64) for p in (encoder.pooler.kernel,
                                                                 encoder.pooler.bias))
        want = np.tanh(first @ kernel + bias)
        assert out.pooled.shape == (2, 64) and np.abs(want).max() > 0.1  # not saturated at 0
        np.testing.assert_allclose(np.asarray(out.pooled), want, atol=1e-5)


@pytest.mark.parametrize("name,overrides", [
    ("m2-bert-tiny", dict()), ("m2-bert-tiny", dict(mixer_norm=True, conv_mode="toeplitz")),
    ("m2-gpt-tiny", dict()), ("m2-gpt-tiny", dict(mlp=False, conv_mode="monarch"))])
def test_channel_major_stack_equals_length_major(jitted, name, overrides):
    # The default channel-major layers compute what the (B, L, D) ones do, pads included
    kw = dict(vocab_size=50, max_len=24, dropout=0.0, seed=0, **overrides)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (3, 24))
    mask = (np.arange(24)[None] < np.array([[24], [17], [9]])).astype(np.int32)
    new = np.asarray(jitted(bigs_jax.create(name, **kw))(ids, mask).logits)
    old = np.asarray(jitted(bigs_jax.create(name, channel_major=False, **kw))(ids, mask).logits)
    assert np.abs(new - old).max() < 1e-5 * np.abs(old).max()
