"""The optimizer state is laid out like the parameters it belongs to.

Computed abstractly on an `AbstractMesh` (no devices, nothing allocated), through the loop's
own `Program.build`: every Adam moment (and every other per-parameter leaf) takes exactly its
parameter's sharding, counts are replicated, frozen parameters hold no state, and the per-device
bytes of params + optimizer state are the total over the mesh's fsdp x tensor factor.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from bigs_jax.paths import path_str
from bigs_jax.train import growth as train_growth
from bigs_jax.train import loop, partitioning
from configs import quickstart


def abstract_mesh(shape):
    return AbstractMesh(tuple(shape), partitioning.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(shape))


def program(model, mesh_shape, **model_overrides):
    config = quickstart.get_config("smoke")
    config.model.name = model
    for key in ("hidden_size", "intermediate_size", "ssm_state", "num_layers"):
        config.model[key] = None  # the registry size, not quickstart's
    for key, value in model_overrides.items():
        config.model[key] = value
    config.optim.freeze = [r"embeddings/position"]
    config.optim.groups = [{"pattern": r"^layers/0/", "lr_scale": 0.1}]
    with nnx.logical_axis_rules(partitioning.DEFAULT_RULES):
        return loop.Program.build(config, loop.model_config_from(config, {}),
                                  abstract_mesh(mesh_shape), partitioning.DEFAULT_RULES, False)


def param_specs(prog):
    return {path_str(p): s.sharding.spec
            for p, s in jax.tree_util.tree_flatten_with_path(prog.abstract_params)[0]}


def check_mirrors(opt_state, specs):
    """Every non-scalar leaf sits under a parameter's path, with that parameter's spec;
    every scalar is replicated. Returns {parameter path: number of leaves mirroring it}."""
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if leaf.shape == ():
            assert leaf.sharding.spec == PartitionSpec(), jax.tree_util.keystr(path)
            continue
        keys = [getattr(k, "key", None) for k in path]
        param = next(("/".join(map(str, keys[j:])) for j in range(len(keys))
                      if None not in keys[j:] and "/".join(map(str, keys[j:])) in specs), None)
        assert param is not None, f"{jax.tree_util.keystr(path)} mirrors no parameter"
        assert leaf.sharding.spec == specs[param], (param, leaf.sharding.spec, specs[param])
        seen[param] = seen.get(param, 0) + 1
    return seen


def test_moments_take_their_parameters_sharding_in_every_group():
    """(2,2,2): default, lr-scaled and frozen groups under clipping; mu and nu of every
    trainable parameter exactly as sharded as it, frozen ones without state."""
    prog = program("bert-tiny", (2, 2, 2), num_heads=4, vocab_multiple=128)
    specs = param_specs(prog)
    assert specs["embeddings/word/embedding"] == PartitionSpec("tensor", "fsdp")
    seen = check_mirrors(prog.abstract_opt, specs)
    frozen = {p for p in specs if p.startswith("embeddings/position")}
    assert frozen and not frozen & set(seen)
    assert seen == {p: 2 for p in specs if p not in frozen}  # mu and nu
    assert any(p.startswith("layers/0/") for p in seen)      # the lr-scaled group's own state
    assert prog.state_shardings.opt_state == jax.tree.map(lambda s: s.sharding,
                                                          prog.abstract_opt)


def test_growth_own_count_masks_take_their_parameters_sharding():
    """The own_count wrapper's per-parameter masks are laid out like the parameters too."""
    prog = program("gpt2-tiny", (1, 2, 4), vocab_multiple=128)
    tx = train_growth.own_count(prog.tx, b1=0.9, b2=0.98)
    opt = jax.eval_shape(tx.init, prog.abstract_params)
    shardings = partitioning.opt_state_shardings(opt, prog.abstract_params,
                                                 jax.tree.map(lambda x: x.sharding,
                                                              prog.abstract_params), prog.mesh)
    specs = param_specs(prog)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       opt, shardings)
    seen = check_mirrors(opt, specs)
    frozen = {p for p in specs if p.startswith("embeddings/position")}
    assert seen == {p: 1 if p in frozen else 3 for p in specs}  # mask; mu, nu and mask
    assert specs["embeddings/word/embedding"] == PartitionSpec("tensor", "fsdp")


def check_bytes_split(model, shape):
    """Per device, params + optimizer state are the total / (fsdp x tensor) within 2%, and the
    optimizer state is Adam's two moments of every trainable parameter (the frozen position
    table holds none); prints the dry run's table of these numbers."""
    prog = program(model, shape, vocab_multiple=128)
    lines, sizes = loop.state_bytes_table(prog)
    print(f"{model} {shape}\n" + "\n".join(lines))
    factor = shape[1] * shape[2]
    for part in ("params", "opt_state", "both"):
        total, per_device = sizes[f"{part}_bytes"]
        assert total / per_device == pytest.approx(factor, rel=0.02), (model, shape, part)
    frozen = sum(int(np.prod(x.shape)) * 4 for p, x in jax.tree_util.tree_flatten_with_path(
        prog.abstract_params)[0] if path_str(p).startswith("embeddings/position"))
    assert abs(sizes["opt_state_bytes"][0] - 2 * (sizes["params_bytes"][0] - frozen)) < 1024


def test_bert_large_state_bytes_split_on_2x2x2():
    check_bytes_split("bert-large", (2, 2, 2))


@pytest.mark.slow  # ~4 x 15 s of abstract builds on a busy 2-core machine
@pytest.mark.parametrize("model", ["bigs-large", "bert-large", "gpt2-medium", "m2-bert-341m"])
def test_state_bytes_per_device_split_by_every_mesh(model):
    for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
        check_bytes_split(model, shape)


def test_an_unpadded_real_vocabulary_on_a_tensor_axis_is_refused_in_one_line():
    """GPT-2's 50257 ids over tensor=2 without vocab_multiple: a ConfigError naming the table
    and the fix, not XLA's IndivisibleError; with vocab_multiple=128 the same mesh builds."""
    with pytest.raises(loop.ConfigError) as e:
        program("gpt2-tiny", (4, 1, 2), vocab_size=50257, ssm_state=None, vocab_multiple=1)
    message = str(e.value)
    assert "\n" not in message
    assert "embeddings/word/embedding (50257, 64): axis 0 (50257) over mesh axes ('tensor',) = 2" \
        in message and "config.model.vocab_multiple=128" in message
    prog = program("gpt2-tiny", (4, 1, 2), vocab_size=50257, ssm_state=None, vocab_multiple=128)
    assert prog.abstract_params["embeddings"]["word"]["embedding"].shape == (50304, 64)
