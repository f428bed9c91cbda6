"""The step's FLOPs counted over its jaxpr (`train/flops.py`): loop bodies times their trip
counts, XLA's conventions elsewhere, and the dry run's number against a hand count."""

import jax
import jax.numpy as jnp
import pytest

from bigs_jax.layers import flash
from bigs_jax.train import flops, loop
from configs import bert


def xla_flops(f, *args) -> float:
    analysis = jax.jit(f).lower(*args).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


def test_a_scanned_matmul_counts_length_times_2mnk_where_xla_counts_it_once():
    M, K, N, steps = 8, 16, 32, 7
    w_KN = jnp.ones((K, N))

    def f(x_MK):
        def body(c_MK, _):
            y_MN = c_MK @ w_KN
            return y_MN[:, :K], None
        return jax.lax.scan(body, x_MK, length=steps)[0]

    x = jnp.ones((M, K))
    assert flops.count(jax.make_jaxpr(f)(x)).flops == steps * 2 * M * N * K
    assert xla_flops(f, x) < 2 * (2 * M * N * K)  # the loop body once (and a counter)


def test_nested_scans_multiply_and_a_cond_counts_its_costliest_branch():
    a = jnp.ones((4, 8))
    b = jnp.ones((8, 8))

    def inner(c, _):
        return c @ b, None

    def outer(c, _):
        c = jax.lax.scan(inner, c, length=3)[0]
        c = jax.lax.cond(c.sum() > 0, lambda x: x @ b @ b, lambda x: x, c)
        return c, None

    count = flops.count(jax.make_jaxpr(lambda x: jax.lax.scan(outer, x, length=5)[0])(a))
    mm = 2 * 4 * 8 * 8
    predicate = (4 * 8 - 1) + 1 + 1  # the sum, > 0, and the bool cast to the branch index
    assert count.flops == 5 * (3 * mm + 2 * mm + predicate)
    assert count.uncounted_loops == []


def test_the_gradient_of_scanned_rematerialized_layers_counts_every_layer():
    """The shape of a scan over layers: a lax.scan of a checkpointed layer under jax.grad.
    Each layer's matmul runs forward, again when rematerialized, and twice backward."""
    n, B, D = 6, 32, 64
    w_NDD = jnp.full((n, D, D), 0.01)
    x_BD = jnp.ones((B, D))

    def loss(w_NDD, x_BD):
        layer = jax.checkpoint(lambda h_BD, w_DD: (jnp.tanh(h_BD @ w_DD), None))
        return jax.lax.scan(layer, x_BD, w_NDD)[0].sum()

    count = flops.count(jax.make_jaxpr(jax.grad(loss))(w_NDD, x_BD))
    matmuls = n * 4 * 2 * B * D * D
    assert matmuls <= count.flops <= 1.02 * matmuls  # + tanh's derivative and the sum
    assert xla_flops(jax.grad(loss), w_NDD, x_BD) < 0.5 * matmuls


def test_a_while_loop_counts_once_and_is_named():
    b = jnp.ones((8, 8))
    f = lambda x: jax.lax.while_loop(lambda c: c.sum() < 1e6, lambda c: c @ b, x)
    count = flops.count(jax.make_jaxpr(f)(jnp.ones((4, 8))))
    assert count.flops == 2 * 4 * 8 * 8 + (4 * 8 - 1) + 1
    [line] = count.uncounted_loops
    assert "while loop at" in line and "test_flops.py" in line and "\n" not in line


@pytest.mark.parametrize("f", [
    lambda x: jnp.fft.rfft(x, n=128, axis=-1),
    lambda x: jnp.fft.irfft(jnp.fft.rfft(x, axis=-1), axis=-1),
    lambda x: jax.nn.softmax(x @ x.T) + jnp.tanh(x).sum(),
    lambda x: jax.lax.conv_general_dilated(x[None], jnp.ones((5, 4, 3)), (1,), "VALID"),
], ids=["rfft", "irfft", "softmax", "conv"])
def test_loop_free_functions_count_what_xla_counts(f):
    x = jnp.ones((4, 64))
    # Within a few FLOPs: XLA folds scalar casts of constants (rfft's zero padding value).
    assert flops.count(jax.make_jaxpr(f)(x)).flops == pytest.approx(xla_flops(f, x), abs=4)


def dry_run(tmp_path, *, grad_accum_steps=1, scan_layers=False):
    """The dry run of a small BERT MLM step (attention in blocks of queries when the scores
    exceed `flash.TILE_FLOATS`); returns (its summary, the config)."""
    config = bert.get_config("size=tiny")
    config.model.update(hidden_size=128, intermediate_size=512, num_heads=2, num_layers=2,
                        dropout=0.0, attention_dropout=0.0)
    config.model.scan_layers = scan_layers
    config.data.update(batch_size=8, seq_len=256)
    config.train.update(max_predictions=40, grad_accum_steps=grad_accum_steps, dry_run=True)
    return loop.train_and_evaluate(config, str(tmp_path / "run")), config


def hand_count(config, vocab: int) -> float:
    """Matmul FLOPs of one BERT MLM train step: 2 per multiply-add, every token of the global
    batch. Dense layers: forward once, backward twice (input and weight gradients). Attention
    (`layers/flash.py`): the forward's 2 matmuls (q·kᵀ, probabilities·v) and the backward's 5
    (q·kᵀ recomputed, then dp, dv, dq, dk)."""
    m, d = config.model, config.data
    D, F, L, P, B = m.hidden_size, m.intermediate_size, d.seq_len, config.train.max_predictions, \
        d.batch_size
    dense = (2 * L * 4 * D * D             # q, k, v and output projections
             + 2 * L * 2 * D * F)          # the feed-forward's two matmuls
    scores = 2 * L * L * D                 # one L x L x D matmul over all heads
    head = 2 * P * D * D + 2 * P * D * vocab  # MLM transform and tied decoder at P positions
    return B * (3 * (m.num_layers * dense + head) + m.num_layers * 7 * scores)


def test_dry_run_flops_equal_a_hand_count_with_blocked_attention_and_accumulation(
        tmp_path, monkeypatch, capsys):
    """Issue 16's acceptance. Per microbatch the scores are (4, 2, 256, 256) floats; a budget
    of 2**17 splits them into 4 query blocks of 64, which XLA's count would see only once;
    the layers run as one scan, and the microbatches as another."""
    assert flash.block_sizes(4, 2, 256, 256) == (256, 256)  # one block unless told
    monkeypatch.setattr(flash, "TILE_FLOATS", 1 << 17)
    assert flash.block_sizes(4, 2, 256, 256) == (64, 256)
    summary, config = dry_run(tmp_path, grad_accum_steps=2, scan_layers=True)
    expected = hand_count(config, vocab=8192)  # the embedded corpus's vocabulary
    assert summary["flops"] == pytest.approx(expected, rel=0.05)
    assert summary["xla_flops"] < 0.6 * expected  # one microbatch, layer and query block
    out = capsys.readouterr().out
    assert f"FLOPs per step per device: {summary['flops']:.4g}" in out
    assert "XLA's cost analysis" in out and "counts each loop body once" in out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_dry_run_flops_agree_with_xla_on_a_loop_free_step(tmp_path):
    summary, config = dry_run(tmp_path)
    assert summary["flops"] == pytest.approx(summary["xla_flops"], rel=0.03)
    assert summary["flops"] == pytest.approx(hand_count(config, vocab=8192), rel=0.05)
    assert summary["uncounted_loops"] == []
