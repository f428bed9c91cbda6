"""Starting a run from another model's checkpoint (`config.init`): what is kept, what is new."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import bigs_jax
from bigs_jax.train import checkpointing, loop, partitioning
from tests.runs import smoke


@pytest.fixture(scope="module")
def pretrained(smoke_run):
    return smoke_run[0]


def _flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_restore_matching_keeps_backbone_and_new_head(pretrained):
    base = checkpointing.read_model_config(pretrained)
    config = dataclasses.replace(base, head="classification", num_labels=3)
    fresh = nnx.to_pure_dict(nnx.state(bigs_jax.build(config, seed=7)))
    mesh = partitioning.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(partitioning.DEFAULT_RULES):
        fresh = jax.device_put(fresh, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        params, report = checkpointing.restore_matching(pretrained, fresh)
    trained = _flat(nnx.to_pure_dict(nnx.state(bigs_jax.load(pretrained))))
    got, new = _flat(params), _flat(fresh)
    backbone = [k for k in got if not k.startswith("classifier/")]
    assert backbone and all(k in trained for k in backbone)
    for k in backbone:
        np.testing.assert_array_equal(got[k], trained[k], err_msg=k)
    heads = [k for k in got if k.startswith("classifier/")]
    assert heads
    for k in heads:
        np.testing.assert_array_equal(got[k], new[k], err_msg=k)
    assert f"{len(backbone)} arrays loaded" in report
    assert "new: classifier/" in report and "unused: mlm_head/" in report


def test_init_model_config_takes_architecture_and_overrides(pretrained):
    config = smoke(2)
    config.init = pretrained
    config.model.head = "classification"
    config.model.num_labels = 5
    got = loop.model_config_from(config, {"vocab_size": 8192})
    base = checkpointing.read_model_config(pretrained)
    assert got == dataclasses.replace(base, head="classification", num_labels=5)
    with pytest.raises(loop.ConfigError, match="vocabulary of 8192 ids but the data's has 30522"):
        loop.model_config_from(config, {"vocab_size": 30522})


def test_init_refuses_misshaped_parameters(pretrained):
    base = checkpointing.read_model_config(pretrained)
    config = dataclasses.replace(base, max_len=base.max_len * 2)
    fresh = nnx.to_pure_dict(nnx.state(bigs_jax.build(config)))
    mesh = partitioning.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(partitioning.DEFAULT_RULES):
        fresh = jax.device_put(fresh, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        with pytest.raises(ValueError, match="does not fit this model: .*position"):
            checkpointing.restore_matching(pretrained, fresh)


def test_init_continues_mlm_training_from_the_checkpoint(smoke_run, tmp_path):
    pretrained, pretraining = smoke_run
    config = smoke(2)
    config.init = pretrained
    summary = loop.train_and_evaluate(config, str(tmp_path))
    # Step 0 of the new run evaluates the pretrained weights: the same loss as their last
    # eval (same eval batches), not the ~9.03 of a fresh model.
    assert summary["eval_loss"][0] == pytest.approx(pretraining["eval_loss"][2], rel=1e-6)
    assert summary["eval_loss"][0] < pretraining["eval_loss"][0] - 0.1
