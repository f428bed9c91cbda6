"""Training through growth: gradients at the growth point, new units that train and differ,
the optimizer state carried over (old moments bit for bit, new-entry policies measured)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax import growth, growth_m2
from bigs_jax.train import checkpointing, loop, optim
from bigs_jax.train import config as train_config
from bigs_jax.train import growth as train_growth
from bigs_jax.train.objectives import OBJECTIVES
from bigs_jax.train.step import TrainState, make_train_step
from configs import m2_vit as m2_vit_run
from tests.test_growth import small_model

B, L = 4, 12


def lm_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (B, L))
    weights = np.ones((B, L), np.float32)
    weights[:, -1] = 0
    weights[1, 7:] = 0
    mask = np.ones((B, L), np.int32)
    mask[1, 8:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(np.roll(ids, -1, 1)), "loss_weights": jnp.asarray(weights)}


def is_image(config) -> bool:
    return type(config).__name__ in ("ViTConfig", "M2ViTConfig")


def image_batch(config, seed=0):
    """Classification batch: random images, labels."""
    rng = np.random.default_rng(seed)
    shape = (B, config.image_size, config.image_size, config.num_channels)
    return {"image": jnp.asarray(rng.standard_normal(shape), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, config.num_labels, B))}


def any_batch(config, seed=0):
    return image_batch(config, seed) if is_image(config) else lm_batch(config, seed)


def objective(config):
    if is_image(config):
        return "classification"
    return "lm" if getattr(config, "causal", type(config).__name__ == "GPT2Config") else "mlm"


def loss_and_grads(config, params, batch):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: bigs_jax.build(config)))
    loss_fn = OBJECTIVES[objective(config)]

    @jax.jit
    def f(p):
        s, w, _ = loss_fn(nnx.merge(graphdef, p), batch, deterministic=True, rngs=None)
        return s / w

    return jax.value_and_grad(f)(params)


def flat(tree):
    return growth._flat_np(jax.tree.map(np.asarray, tree))


@pytest.mark.parametrize("family,sizes", [
    ("gpt2", dict(intermediate_size=300, num_heads=3, v_head_dim=40, num_layers=4)),
    pytest.param("bigs", dict(intermediate_size=300, ssm_state=24, num_layers=3),
                 marks=pytest.mark.slow),
    pytest.param("m2-gpt", dict(intermediate_size=320, mlp_nblocks=2), marks=pytest.mark.slow),
    pytest.param("m2-vit", dict(intermediate_size=320, mlp_nblocks=2, num_layers=3),
                 marks=pytest.mark.slow),
])
def test_old_gradients_equal_the_small_models(family, sizes):
    """MLP, heads, value size, SSM state, block merging and pre-LN depth leave the function
    unchanged near θ_old, so the old entries' gradients are the small model's."""
    config, params = small_model(family)
    b = any_batch(config)
    loss0, g0 = loss_and_grads(config, params, b)
    new_config, new_params = growth.grow_params(config, params, seed=1, **sizes)
    _, maps, order = growth.index_maps(config, params, **sizes)
    loss1, g1 = loss_and_grads(new_config, new_params, b)
    assert abs(float(loss0) - float(loss1)) < 1e-6
    g0_cat = np.concatenate([flat(g0)[p].ravel() for p in order])
    worst = 0.0
    for path, g in flat(g1).items():
        old = maps[path] > 0
        worst = max(worst, float(np.abs(g[old] - g0_cat[maps[path][old] - 1]).max(initial=0)))
    assert worst < 1e-6, worst


def adam_state(config, params, b2=0.98):
    c = train_config.base_config(model="gpt2-tiny", task="x", objective=objective(config))
    c.optim.update(b2=b2, warmup_steps=0, schedule="constant", lr=3e-3)
    make_tx = lambda p: optim.make_optimizer(c.optim, p, 1000)[0]
    tx = make_tx(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
    return state, tx, make_tx


def train(config, state, tx, steps, seed=0):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: bigs_jax.build(config)))
    step = jax.jit(make_train_step(graphdef, tx, functools.partial(
        OBJECTIVES[objective(config)], max_predictions=0)))
    history = []
    for i in range(steps):
        state, stats = step(state, any_batch(config, seed + i))
        history.append(state.params)
    return state, history


@pytest.mark.parametrize("family", ["gpt2", pytest.param("bert", marks=pytest.mark.slow)])
def test_new_parameters_get_gradients_and_differ_within_three_steps(family):
    sizes = {"gpt2": dict(intermediate_size=300, num_heads=3, qk_head_dim=40, v_head_dim=36,
                          hidden_size=100, num_layers=3),
             "bert": dict(intermediate_size=300, num_heads=3, hidden_size=128,
                          num_layers=3)}[family]
    config, params = small_model(family)
    state, _, make_tx = adam_state(config, params)
    grown, new_config, tx = train_growth.grow_state(state, config, make_tx, seed=2, **sizes)
    _, maps, _ = growth.index_maps(config, params, **sizes)
    grown, _ = train(new_config, grown, tx, 3)
    b = lm_batch(new_config, 9)
    _, g = loss_and_grads(new_config, grown.params, b)
    g = flat(g)
    # Embedding rows the batch does not use get no gradient, new columns or old.
    used = {"embeddings/word/embedding": np.unique(np.asarray(b["input_ids"])),
            "embeddings/position/embedding": np.arange(L - 1),  # the last one has no loss
            "embeddings/token_type/embedding": np.arange(1)}
    for path, idx in maps.items():
        rows = used.get(path, slice(None))
        new = idx[rows] == 0
        # A key bias adds q·b to every score of a query: softmax ignores it (zero gradient).
        if not new.any() or path.endswith("key/bias"):
            continue
        frac = np.mean(np.abs(g[path][rows][new]) > 0)
        assert frac > 0.99, (path, frac)  # no dead new entries
    p = flat(grown.params)
    up = p["layers/0/mlp/up/kernel"]  # new MLP units: no two alike, none a copy of an old one
    cols = up.T
    d = np.abs(cols[:, None, :] - cols[None, :, :]).sum(-1) + np.eye(len(cols))
    assert d.min() > 0
    writer = p["layers/0/mixer/out/kernel"]  # hidden growth: new stream dims differ
    h = config.hidden_size
    new_cols = writer[:, h:].T
    assert min(np.abs(c - o).sum() for c in new_cols for o in writer[:, :h].T) > 0


def test_optimizer_state_old_moments_bit_for_bit():
    config, params = small_model("gpt2")
    state, tx, make_tx = adam_state(config, params)
    state, _ = train(config, state, tx, 5)
    sizes = dict(intermediate_size=300, num_heads=3, hidden_size=100, num_layers=3)
    grown, _, _ = train_growth.grow_state(state, config, make_tx, **sizes)
    _, maps, order = growth.index_maps(config, jax.device_get(state.params), **sizes)
    old_mu = flat(state.opt_state[1].inner_states["default"].inner_state[0].mu)
    old_nu = flat(state.opt_state[1].inner_states["default"].inner_state[0].nu)
    adam = grown.opt_state[1].inner_states["default"].inner_state[0]
    new_mu, new_nu = flat(adam.mu), flat(adam.nu)
    for old, new, what in ((old_mu, new_mu, "mu"), (old_nu, new_nu, "nu")):
        cat = np.concatenate([old[p].ravel() for p in order if p in old])
        offsets = np.cumsum([0] + [old[p].size for p in order if p in old])
        assert len(old) == len(order)  # every parameter is in the default group
        del offsets
        for path, idx in maps.items():
            sel = idx > 0
            assert np.array_equal(new[path][sel], cat[idx[sel] - 1]), (what, path)
            if what == "mu":
                assert not new[path][~sel].any()
            elif (~sel).any() and sel.any():
                np.testing.assert_allclose(new[path][~sel],
                                           np.median(cat[idx[sel] - 1]), rtol=1e-6)
    assert int(adam.count) == 5


@functools.lru_cache(maxsize=None)
def pretrained(b2):
    config, params = small_model("gpt2")
    state, tx, make_tx = adam_state(config, params, b2=b2)
    return config, train(config, state, tx, 20)[0], make_tx


def update_ratios(policy, b2, steps=10):
    """Median |update| of the new vs the old entries of layers/0/mlp/up/kernel after growth."""
    config, state, make_tx = pretrained(b2)
    sizes = dict(intermediate_size=300, num_layers=3)
    grown, new_config, tx = train_growth.grow_state(state, config, make_tx, policy=policy,
                                                    betas=(0.9, b2), **sizes)
    _, maps, _ = growth.index_maps(config, jax.device_get(state.params), **sizes)
    new = maps["layers/0/mlp/up/kernel"] == 0
    _, history = train(new_config, grown, tx, steps, seed=100)
    before = [grown.params] + history[:-1]
    ratios = []
    for a, b in zip(before, history):
        d = np.abs(np.asarray(b["layers"][0]["mlp"]["up"]["kernel"])
                   - np.asarray(a["layers"][0]["mlp"]["up"]["kernel"]))
        ratios.append(float(np.median(d[new]) / np.median(d[~new])))
    return ratios


def test_new_entries_first_updates_not_inflated():
    """The default policy keeps new entries' updates ≤ 1.5x the old ones' over the first
    steps; zero moments with the old count (MSG's transfer) inflate them at β2 = 0.999."""
    ours = update_ratios("nu_median", 0.999)
    zero = update_ratios("zero", 0.999)
    print("new/old median |update|, steps 1-10: nu_median", np.round(ours, 2),
          "zero", np.round(zero, 2))
    assert max(ours) <= 1.5, ours
    assert max(zero) > 1.5, zero
    assert max(ours[5:]) > 0  # the new entries do move


# ---------------------------------------------------------------------------- M2 hidden size


def _collapse(g, roles, K, m):
    """A grown M2 gradient mapped back to the small model's entries (growth_m2's layout):
    writers' copies summed, a tied norm's copies averaged, readers' m parts checked equal and
    one kept. Returns (collapsed, max spread between the parts of a reader)."""
    spread = 0.0
    for axis, role in enumerate(roles or ()):
        if role is None:
            continue
        groups = {"W": K, "T": K, "R": K, "W3": 3 * K}.get(role, 1)
        shape = list(g.shape)
        g = g.reshape(shape[:axis] + [groups, m, shape[axis] // (groups * m)]
                      + shape[axis + 1:])
        if role in ("R", "Rb"):
            spread = max(spread, float(np.abs(g - np.take(g, [0], axis + 1)).max()))
            g = np.take(g, 0, axis=axis + 1)
        else:
            g = g.sum(axis + 1) / (m if role == "T" else 1)
        g = g.reshape(shape[:axis] + [-1] + shape[axis + 1:])
    return g, spread


@pytest.mark.parametrize("family", ["m2-gpt", pytest.param("m2-bert", marks=pytest.mark.slow),
                                    pytest.param("m2-vit", marks=pytest.mark.slow)])
def test_m2_hidden_growth_gradients_map_to_the_small_models(family):
    """At the growth point each part of a split reader row has the small model's gradient of
    that row, the copies of a writer (or per-channel parameter) sum to it, and shared
    parameters (the filter MLPs' hidden layers) keep it: the chain rule through x̃ = tile(x).
    Checked in float64 to 1e-6 relative to each leaf's largest gradient: the long-conv
    filters compute in float32 whatever the dtype (models.m2), so their backward pass sums the
    copies' float32 gradients in another order (1.3e-7 measured; 1e-6 in float32)."""
    with jax.enable_x64():
        config, params = small_model(family, "float64")
        b = any_batch(config)
        if is_image(config):
            b = {**b, "image": b["image"].astype(jnp.float64)}
        loss0, g0 = loss_and_grads(config, params, b)
        new_config, new_params = growth.grow_params(config, params, seed=1, hidden_size=128)
        loss1, g1 = loss_and_grads(new_config, new_params, b)
    assert abs(float(loss0) - float(loss1)) < 1e-12
    g0, g1 = flat(g0), flat(g1)
    worst, spread = 0.0, 0.0
    for path, g in g1.items():
        back, s = _collapse(g, growth_m2._hidden_roles(config, path), config.mlp_nblocks, 2)
        scale = max(1.0, float(np.abs(g0[path]).max()))
        worst = max(worst, float(np.abs(back - g0[path]).max()) / scale)
        spread = max(spread, s / scale)
    assert worst < 1e-6 and spread < 1e-12, (worst, spread)


@pytest.mark.parametrize("family", ["m2-gpt", "m2-vit"])
@pytest.mark.slow
def test_m2_hidden_growth_trains_and_carries_the_optimizer_state(family):
    """M2-GPT / M2-ViT widened 64 → 128 inside a TrainState: old Adam moments land bit for
    bit where the growth put their entries, new entries get μ = 0 and ν = the old median;
    after 3 steps every new entry has a gradient, the copies of a writer no longer equal their
    source, and the first update of new entries is not inflated (≤ 1.5x the old entries'
    median)."""
    config, params = small_model(family)
    state, tx, make_tx = adam_state(config, params)
    state, _ = train(config, state, tx, 5)
    sizes = dict(hidden_size=128, intermediate_size=320)
    grown, new_config, tx = train_growth.grow_state(state, config, make_tx, seed=2, **sizes)
    _, maps, order = growth.index_maps(config, jax.device_get(state.params), seed=2, **sizes)
    old_adam = state.opt_state[1].inner_states["default"].inner_state[0]
    adam = grown.opt_state[1].inner_states["default"].inner_state[0]
    for what in ("mu", "nu"):
        old, new = flat(getattr(old_adam, what)), flat(getattr(adam, what))
        cat = np.concatenate([old[p].ravel() for p in order])
        for path, idx in maps.items():
            sel = idx > 0
            assert np.array_equal(new[path][sel], cat[idx[sel] - 1]), (what, path)
            if what == "mu":
                assert not new[path][~sel].any(), path
            elif (~sel).any():
                np.testing.assert_allclose(new[path][~sel], np.median(cat[idx[sel] - 1]),
                                           rtol=1e-6)
    grown1, history = train(new_config, grown, tx, 3, seed=50)
    key = "layers/0/mixer/out_linear/kernel"
    new = maps[key] == 0
    step1 = np.abs(flat(history[0])[key] - flat(grown.params)[key])
    ratio = float(np.median(step1[new]) / np.median(step1[~new]))
    print(f"{family} hidden growth: first update of new / old entries of {key}: {ratio:.2f}x")
    assert ratio <= 1.5, ratio
    b = any_batch(new_config, 9)
    _, g = loss_and_grads(new_config, grown1.params, b)
    g = flat(g)
    used = {} if is_image(config) else {
        "embeddings/word/embedding": np.unique(np.asarray(b["input_ids"])),
        "embeddings/position/embedding": np.arange(L - 1)}
    for path, idx in maps.items():
        rows = used.get(path, slice(None))
        sel = idx[rows] == 0
        if sel.any():
            assert np.mean(np.abs(g[path][rows][sel]) > 0) > 0.99, path
    w = flat(grown1.params)[key]
    source = growth_m2.stream_index(config, 128)
    first = np.unique(source, return_index=True)[1]  # where each old channel's first copy is
    copies = [c for c in range(128) if c not in set(first)]
    assert min(np.abs(w[:, c] - w[:, first[source[c]]]).sum() for c in copies) > 0


# ---------------------------------------------------------------------------- M2-ViT train run

M2_VIT_GROWTH = [{"step": 5, "hidden_size": 128, "num_layers": 3, "intermediate_size": 320,
                  "mlp_nblocks": 2}]


@pytest.mark.slow  # ~40 s, as the BiGS growth-schedule runs of test_growth_loop.py
def test_m2_vit_growth_schedule_in_a_classification_run(tmp_path, digits_dir):
    """configs/m2_vit.py:smoke (M2-ViT on the sklearn digits) with a growth schedule at step 5
    (width 64 → 128, 2 → 3 layers, MLP 256 → 320 in 2 blocks): the eval loss right after
    growth equals the loss before (1e-5) and keeps falling; the grown workdir loads."""
    c = m2_vit_run.get_config("smoke")
    c.data.data_dir = digits_dir
    c.data.eval_batches = 1
    c.optim.update(schedule="constant", warmup_steps=0, lr=5e-3)
    c.train.update(steps=10, checkpoint_every=4, eval_every=5, log_every=1)
    c.growth = json.dumps(M2_VIT_GROWTH)
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(c, workdir)
    before, after = (summary["growth"][5][k] for k in ("eval_loss_before", "eval_loss_after"))
    print(f"M2-ViT eval loss at the growth step: before {before:.7f}, after {after:.7f}; "
          f"eval losses {summary['eval_loss']}")
    assert abs(before - after) < 1e-5
    # Adam's first steps from the zero head overshoot (2.30 → 2.33 by step 5); after growth
    # the loss falls below both
    assert summary["eval_loss"][10] < min(summary["eval_loss"][5], summary["eval_loss"][0])
    assert summary["steps"] == 10 and summary["checkpoints"] == [5, 8, 10]  # 3 kept
    grown = checkpointing.read_model_config(workdir)
    assert (grown.hidden_size, grown.num_layers, grown.intermediate_size, grown.mlp_nblocks,
            grown.decay_tiling) == (128, 3, 320, 2, ((2, 2),))
    assert bigs_jax.load(workdir).config == grown
