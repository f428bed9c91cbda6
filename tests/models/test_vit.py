"""ViT against HF `ViTForImageClassification` (PyTorch, CPU), plus invariants and sizes."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.models import make_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    """The HF ViTConfig equivalent to our ViT size `kw` (ours: norm_eps 1e-6 by default)."""
    return transformers.ViTConfig(
        image_size=kw["image_size"], patch_size=kw["patch_size"],
        num_channels=kw["num_channels"], hidden_size=kw["hidden_size"],
        num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
        intermediate_size=kw["intermediate_size"], num_labels=kw.get("num_labels", 1000),
        layer_norm_eps=kw.get("norm_eps", 1e-6), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def copy_hf_weights(model, hf) -> None:
    """Load HF ViTForImageClassification weights into our ViT (every leaf exactly once)."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    used = set()

    def get(key, fn=lambda x: x):
        used.add(key)
        return jnp.asarray(fn(sd[key]))

    def linear(dst, key):
        dst.kernel[...] = get(f"{key}.weight", np.transpose)
        dst.bias[...] = get(f"{key}.bias")

    def norm(dst, key):
        dst.scale[...] = get(f"{key}.weight")
        dst.bias[...] = get(f"{key}.bias")

    e = "vit.embeddings"
    # Conv2d weight (D, C, P, P) -> our (P, P, C, D).
    model.patch_embed.kernel[...] = get(f"{e}.patch_embeddings.projection.weight",
                                        lambda w: w.transpose(2, 3, 1, 0))
    model.patch_embed.bias[...] = get(f"{e}.patch_embeddings.projection.bias")
    model.cls[...] = get(f"{e}.cls_token", lambda w: w[0, 0])
    model.position[...] = get(f"{e}.position_embeddings", lambda w: w[0])
    for i, layer in enumerate(model.layers):
        p = f"vit.encoder.layer.{i}"
        norm(layer.mixer_norm, f"{p}.layernorm_before")
        for name in ("query", "key", "value"):
            linear(getattr(layer.mixer, name), f"{p}.attention.attention.{name}")
        linear(layer.mixer.out, f"{p}.attention.output.dense")
        norm(layer.mlp_norm, f"{p}.layernorm_after")
        linear(layer.mlp.up, f"{p}.intermediate.dense")
        linear(layer.mlp.down, f"{p}.output.dense")
    norm(model.final_norm, "vit.layernorm")
    linear(model.head, "classifier")
    assert used == set(sd), set(sd) ^ used


SHAPES = [
    dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_layers=2, num_heads=4,
         intermediate_size=128, num_labels=10),
    dict(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_layers=3, num_heads=1,
         intermediate_size=48, num_labels=7),
    dict(image_size=16, patch_size=8, num_channels=3, hidden_size=24, num_layers=1, num_heads=2,
         intermediate_size=96, num_labels=3, norm_eps=1e-12),
]


@pytest.mark.parametrize("kw", SHAPES)
def test_logits_equal_hf_vit(kw):
    """HF weights copied over: logits and final hidden states equal HF's within 1e-4."""
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_config(**kw)).eval()
    # HF zero-inits the [CLS] token and biases; randomize everything so each leaf matters.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model = bigs_jax.create("vit-tiny", head_zero_init=False, **kw)
    copy_hf_weights(model, hf)
    rng = np.random.RandomState(1)
    x_BHWC = rng.randn(4, kw["image_size"], kw["image_size"], kw["num_channels"])
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x_BHWC.transpose(0, 3, 1, 2), dtype=torch.float32),
                 output_hidden_states=True)
    out = jax.jit(lambda x: model(x))(jnp.asarray(x_BHWC, jnp.float32))
    err = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    assert err < 1e-4, err
    assert float(np.abs(ref.logits.numpy()).max()) > 0.1  # not a trivially small output
    # HF's last hidden_states entry is before its final LayerNorm; apply it to compare.
    hf_h = hf.vit.layernorm(ref.hidden_states[-1]).detach().numpy()
    np.testing.assert_allclose(np.asarray(out.hidden_states), hf_h, atol=1e-4)


@pytest.mark.parametrize("name", ["vit-tiny", "vit-ti16", "vit-s16", "vit-b16", "vit-l16"])
def test_param_count_equals_hf(name):
    c = make_config(name)
    kw = {f: getattr(c, f) for f in ("image_size", "patch_size", "num_channels", "hidden_size",
                                     "num_layers", "num_heads", "intermediate_size",
                                     "num_labels")}
    with torch.device("meta"):
        hf = transformers.ViTForImageClassification(hf_config(**kw))
    ours = bigs_jax.count_params(nnx.eval_shape(lambda: bigs_jax.create(name)))
    assert ours == sum(p.numel() for p in hf.parameters())
    if name == "vit-b16":
        assert ours == 86_567_656  # the paper's "86M" ViT-B/16 at 1000 classes


def _patch_permutation(n_side, seed=0):
    return np.random.RandomState(seed).permutation(n_side * n_side)


def _permute_patches(x_BHWC, perm, P):
    """Move patch perm[j] of the image to position j (row-major patch order)."""
    B, H, W, C = x_BHWC.shape
    h, w = H // P, W // P
    p_BNppC = x_BHWC.reshape(B, h, P, w, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(
        B, h * w, P, P, C)
    p_BNppC = p_BNppC[:, perm]
    return p_BNppC.reshape(B, h, w, P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_patch_permutation_invariance(pool):
    """Attention is permutation-equivariant: shuffling the patches together with their position
    embeddings leaves the logits unchanged; shuffling the patches alone changes them."""
    model = bigs_jax.create("vit-tiny", pool=pool, head_zero_init=False)
    x = np.random.RandomState(0).rand(3, 8, 8, 1).astype(np.float32)
    perm = _patch_permutation(4)
    xp = _permute_patches(x, perm, 2)
    np.testing.assert_array_equal(_permute_patches(xp, np.argsort(perm), 2), x)
    logits = lambda m, x: np.asarray(jax.jit(lambda x: m(x).logits)(x))
    ref, moved = logits(model, x), logits(model, xp)
    assert np.abs(moved - ref).max() > 1e-3
    pos = model.position[...]
    off = 1 if pool == "cls" else 0
    model.position[...] = jnp.concatenate([pos[:off], pos[off:][perm]], axis=0)
    np.testing.assert_allclose(logits(model, xp), ref, atol=1e-5)


def test_patch_embedding_is_the_strided_conv():
    """Our einsum patch embedding equals lax.conv with stride P and the same (P,P,C,D) kernel."""
    model = bigs_jax.create("vit-tiny", image_size=12, patch_size=4, num_channels=3)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 12, 12, 3), jnp.float32)
    k = model.patch_embed.kernel[...]
    conv = jax.lax.conv_general_dilated(x, k, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    conv = conv.reshape(2, 9, -1) + model.patch_embed.bias[...][None, None]
    np.testing.assert_allclose(np.asarray(model.patch_embed(x)), np.asarray(conv), atol=1e-5)


def test_remat_equals_no_remat():
    x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 1), jnp.float32)
    y = jnp.asarray([3, 7])

    def loss_and_grads(remat):
        model = bigs_jax.create("vit-tiny", remat=remat, head_zero_init=False, num_layers=1)
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(x).logits
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum()

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = loss_and_grads("none"), loss_and_grads("full")
    assert float(l0) == pytest.approx(float(l1), abs=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_dtype_policy():
    x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 1), jnp.float32)
    ref = bigs_jax.create("vit-tiny", head_zero_init=False)
    bf = bigs_jax.create("vit-tiny", head_zero_init=False, param_dtype="bfloat16",
                         dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    out, out32 = jax.jit(lambda x: bf(x))(x), jax.jit(lambda x: ref(x))(x)
    assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
    scale = float(jnp.abs(out32.logits).max())
    err = float(jnp.abs(out.logits - out32.logits).max())
    assert 0 < err < 3e-2 * scale, (err, scale)
    assert bigs_jax.create("vit-tiny", output_dtype="bfloat16")(x).logits.dtype == jnp.bfloat16


def test_bad_inputs_are_refused_with_the_expected_shape():
    model = bigs_jax.create("vit-tiny")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 8, 8, 1\)"):
        model(jnp.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        make_config("vit-tiny", image_size=9)
    with pytest.raises(ValueError, match="unknown pool"):
        make_config("vit-tiny", pool="max")


# ---------------------------------------------------------------------------- training

def _digits_config(module, data_dir, **train):
    c = importlib.import_module(f"configs.{module}").get_config("smoke")
    c.data.data_dir = data_dir
    for key, value in train.items():
        c.train[key] = value
    return c


def test_smoke_config_trains_through_the_loop(tmp_path, digits_dir):
    """configs/vit.py:smoke wires the digits through train.py's loop (a few steps here)."""
    from bigs_jax.train import loop

    c = _digits_config("vit", digits_dir, steps=4, eval_every=4, checkpoint_every=4)
    c.data.eval_batches = 1
    summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["steps"] == 4 and summary["checkpoints"] == [4]
    acc = summary["eval_metrics"][4]["accuracy"]
    assert 0.0 <= acc <= 1.0
    model = bigs_jax.load(str(tmp_path / "run"))
    assert model.config.num_labels == 10 and model.config.image_size == 8


@pytest.mark.slow
@pytest.mark.parametrize("module", ["vit", "m2_vit"])
def test_smoke_config_reaches_90_percent_on_digits(tmp_path, module):
    """Acceptance: the `:smoke` run reaches >= 90% test accuracy on the 360 held-out digits."""
    import time

    from bigs_jax.train import loop

    start = time.perf_counter()
    c = _digits_config(module, str(tmp_path / "tfds"))  # the dataset build is timed too
    summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["eval_metrics"][c.train.steps]["accuracy"] >= 0.9
    assert time.perf_counter() - start < 300
