"""Encoder invariants: padding independence, bidirectionality, official BiGS parity and size."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.convert.bigs_official import official_to_ours, ours_to_official
from tests.reference.bigs_numpy import bigs_mlm_forward

VARIANTS = [("stack", "attention"), ("stack", "ssm"), ("gated", "attention"), ("gated", "ssm")]
# init_std ~ 1/sqrt(hidden): with BERT's 0.02 the blocks' outputs would be ~1e-3 of the
# residual stream, and a relative tolerance on the outputs would not see a wrong block.
TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4,
            ssm_state=8, max_len=40, dropout=0.0, attention_dropout=0.0, init_std=0.2,
            mlm_head_init_std=0.2)


def tiny(block, mixer, **kw):
    return bigs_jax.create("bert-tiny", block=block, mixer=mixer, **{**TINY, **kw})


def flat(tree):
    """{'layers/0/dv/kernel': leaf} of a nested dict."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("block,mixer", VARIANTS)
def test_padding_independence(block, mixer, jitted):
    """A right-padded batch gives, on real tokens, the outputs of each example alone."""
    model = jitted(tiny(block, mixer))
    rng = np.random.default_rng(0)
    lengths = [7, 33, 1, 20]
    pad_to = 40
    ids = rng.integers(1, TINY["vocab_size"], (len(lengths), pad_to))
    mask = (np.arange(pad_to)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask, ids, 0)
    batched = model(ids, mask)
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, :n], np.ones((1, n), np.int32))
        for name in ("hidden_states", "logits"):
            got = np.asarray(getattr(batched, name))[b, :n]
            want = np.asarray(getattr(alone, name))[0]
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-5, (name, b, n, err)


@pytest.mark.parametrize("block,mixer", VARIANTS)
def test_bidirectional(block, mixer):
    """d out[t] / d in[s] is non-zero both for s < t and for s > t."""
    model = tiny(block, mixer)
    L, t = 12, 5
    x = jax.random.normal(jax.random.key(0), (1, L, TINY["hidden_size"]))
    mask = jnp.ones((1, L), jnp.int32)
    from bigs_jax.layers.attention import make_attention_mask

    attn = make_attention_mask(mask, L)

    w = jax.random.normal(jax.random.key(1), (TINY["hidden_size"],))

    def out_t(x):  # a random projection: the sum of a LayerNorm output is constant
        for layer in model.layers:
            x = layer(x, mask, attn)
        return x[0, t] @ w

    g = np.abs(np.asarray(jax.jit(jax.grad(out_t))(x)))[0].sum(-1)
    assert g[:t].min() > 0 and g[t + 1 :].min() > 0, g


@pytest.mark.parametrize("mode", ["scan", "toeplitz"])
def test_ssm_modes_agree_in_model(mode, jitted):
    base = jitted(tiny("gated", "ssm", ssm_mode="fft"))
    other = jitted(tiny("gated", "ssm", ssm_mode=mode))
    ids = np.random.default_rng(1).integers(1, 97, (2, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    a, b = base(ids, mask).logits, other(ids, mask).logits
    assert np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max() < 1e-5


@pytest.mark.parametrize("official", [False, True])
def test_chunked_mode_agrees_with_fft_in_model(official, jitted):
    """The chunked mode (anticausal backward SSM, no reversal) equals the FFT mode on every
    real token; with official padding, on pads too (both flip the full length)."""
    kw = dict(official_padding=official, max_len=600)
    base = jitted(tiny("gated", "ssm", ssm_mode="fft", **kw))
    other = jitted(tiny("gated", "ssm", ssm_mode="chunked", **kw))
    ids = np.random.default_rng(1).integers(1, 97, (2, 600))  # 3 chunks of 256: states carry
    mask = np.ones_like(ids)
    mask[1, 300:] = 0
    a, b = np.asarray(base(ids, mask).logits), np.asarray(other(ids, mask).logits)
    real = slice(None) if official else mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() / np.abs(a).max() < 1e-5


def test_official_padding_reproduces_official_behaviour(jitted):
    """official_padding=True equals the float64 numpy reference of the official code (pads
    included); the default mode differs from it on padded rows only."""
    model = tiny("gated", "ssm", official_padding=True, max_len=24)
    params = flat(nnx.to_pure_dict(nnx.state(model)))
    official = {}
    for path, value in params.items():
        name = ours_to_official(path)
        assert name is not None, path
        node = official
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 97, (2, 24))
    ids[1, 15:] = 0  # padded the way the official scripts pad: [PAD] tokens, no mask
    mask = (ids != 0).astype(np.int32)
    h_ref, logits_ref = bigs_mlm_forward(official, ids)
    out = jitted(model)(ids, mask)
    scale = np.abs(logits_ref).max()
    assert np.abs(np.asarray(out.logits) - logits_ref).max() / scale < 1e-5
    assert np.abs(np.asarray(out.hidden_states) - h_ref).max() / np.abs(h_ref).max() < 1e-5
    fixed = nnx.merge(*nnx.split(tiny("gated", "ssm", max_len=24)))
    nnx.update(fixed, nnx.state(model))
    out_fixed = jitted(fixed)(ids, mask)
    diff = np.abs(np.asarray(out_fixed.logits) - logits_ref).max(-1).max(-1)
    assert diff[0] / scale < 1e-5  # unpadded row: identical
    assert diff[1] / scale > 1e-3  # padded row: pads no longer leak into real tokens


OFFICIAL_SHAPES = {  # research/bigs.md §1.6, L = 128, per layer i
    "s4_bert/embeddings/word_embeddings/embedding": (30522, 1024),
    "s4_bert/embeddings/position_embeddings/embedding": (128, 1024),
    "s4_bert/embeddings/token_type_embeddings/embedding": (2, 1024),
    "s4_bert/embeddings/LayerNorm/scale": (1024,),
    "s4_bert/embeddings/LayerNorm/bias": (1024,),
    "cls/predictions/transform/dense/kernel": (1024, 1024),
    "cls/predictions/transform/dense/bias": (1024,),
    "cls/predictions/transform/LayerNorm/scale": (1024,),
    "cls/predictions/transform/LayerNorm/bias": (1024,),
    "cls/predictions/bias": (30522,),
}
for _i in range(23):
    _p = f"s4_bert/encoder/layer/{_i}"
    OFFICIAL_SHAPES.update({f"{_p}/LayerNorm/scale": (1024,), f"{_p}/LayerNorm/bias": (1024,)})
    for _d in ("fs4", "bs4"):
        OFFICIAL_SHAPES.update({f"{_p}/{_d}/A_re": (64,), f"{_p}/{_d}/A_im": (64,),
                                f"{_p}/{_d}/C": (64, 2), f"{_p}/{_d}/D": (1,),
                                f"{_p}/{_d}/log_step": (1,)})
    for _d, (i, o) in {"dv": (1024, 3072), "du_forward": (1024, 1024),
                       "du_backward": (1024, 1024), "duc_forward": (1024, 1024),
                       "duc_backward": (1024, 1024), "dol": (1024, 3072),
                       "do": (3072, 1024)}.items():
        OFFICIAL_SHAPES.update({f"{_p}/{_d}/kernel": (i, o), f"{_p}/{_d}/bias": (o,)})


def test_official_size_count_and_names():
    """bigs-large at L=128: 346,314,134 params, mapping one-to-one onto the official tree."""
    model = nnx.eval_shape(lambda: bigs_jax.create("bigs-large", max_len=128))
    assert bigs_jax.count_params(model) == 346_314_134
    ours = {path: v.shape for path, v in flat(nnx.to_pure_dict(nnx.state(model))).items()}
    mapped = {ours_to_official(p): s for p, s in ours.items()}
    assert None not in mapped
    assert mapped == OFFICIAL_SHAPES
    assert {official_to_ours(n) for n in OFFICIAL_SHAPES} == set(ours)
    assert sum(int(np.prod(s)) for s in OFFICIAL_SHAPES.values()) == 346_314_134


def test_registry_errors_list_valid_names():
    with pytest.raises(ValueError, match="valid names: .*bigs-large"):
        bigs_jax.create("bigs-huge")
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['hiden_size']")):
        bigs_jax.create("bigs-tiny", hiden_size=3)
    # found by tests/probe_bad_inputs.py: num_layers=-1 built a model with no layers
    with pytest.raises(ValueError, match=re.escape("model 'bert-tiny': num_layers=-1, "
                                                   "max_len=0 must be >= 1")):
        bigs_jax.create("bert-tiny", num_layers=-1, max_len=0)


@functools.cache
def remat_loss_and_grads(remat):
    """Jitted value and gradients of a fixed loss of the gated-SSM model under `remat`."""
    ids = np.random.default_rng(3).integers(1, 97, (2, 40))
    mask = np.ones_like(ids)
    mask[0, 30:] = 0
    graphdef, state = nnx.split(tiny("gated", "ssm", remat=remat))

    def loss(state):
        return (nnx.merge(graphdef, state)(ids, mask).logits ** 2).mean()

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_loss_and_gradients(policy):
    (l0, g0), (l1, g1) = remat_loss_and_grads("none"), remat_loss_and_grads(policy)
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
