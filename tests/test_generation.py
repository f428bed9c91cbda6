"""bigs_jax.generate: cached decoding equals full recomputation, padding and batching change
nothing, sampling is seeded and follows the model's distribution, beam search equals HF's,
and nothing recompiles per token or per prompt length within a bucket."""

import numpy as np
import pytest
from scipy import stats

import bigs_jax
from bigs_jax import generation

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_len=64)
PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 60, 33, 7, 12, 71, 8, 5, 22, 90], [44]]


@pytest.fixture(scope="module")
def gpt2():
    return bigs_jax.create("gpt2-tiny", **TINY)


@pytest.fixture(scope="module")
def full_forward(gpt2, jitted):
    """logits (L, C) of one prompt by the plain forward, at one padded shape (one compile)."""
    forward = jitted(gpt2)

    def logits(ids):
        block = np.zeros((1, TINY["max_len"]), np.int32)
        block[0, :len(ids)] = ids
        mask = (np.arange(TINY["max_len"]) < len(ids))[None].astype(np.int32)
        return np.asarray(forward(block, mask).logits)[0, :len(ids)]

    return logits


def recompute_greedy(full_forward, prompt, n):
    """Greedy by recomputing the whole prefix every step: (tokens, logits of each step)."""
    ids, steps = list(prompt), []
    for _ in range(n):
        step = full_forward(ids)[-1]
        steps.append(step)
        ids.append(int(step.argmax()))
    return ids[len(prompt):], np.stack(steps)


def test_cached_greedy_equals_recompute(gpt2, full_forward):
    out = bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=12, output_logits=True,
                            return_dict=True)
    assert out.sequences.shape == (3, 11 + 12) and out.prompt_len == 11
    np.testing.assert_array_equal(out.num_new, [12, 12, 12])
    for b, prompt in enumerate(PROMPTS):
        tokens, logits = recompute_greedy(full_forward, prompt, 12)
        assert out.tolist()[b] == tokens
        np.testing.assert_array_equal(out.sequences[b, :len(prompt)], prompt)
        np.testing.assert_allclose(out.logits[b], logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_prompts(gpt2, side):
    P = max(map(len, PROMPTS))
    ids = np.full((3, P), 7, np.int32)  # pads hold a real token id: the mask must hide them
    mask = np.zeros((3, P), np.int32)
    for b, p in enumerate(PROMPTS):
        where = slice(P - len(p), P) if side == "left" else slice(0, len(p))
        ids[b, where], mask[b, where] = p, 1
    batched = bigs_jax.generate(gpt2, ids, mask, max_new_tokens=10)
    np.testing.assert_array_equal(batched[:, :P], ids)
    for b, p in enumerate(PROMPTS):
        alone = bigs_jax.generate(gpt2, [p], max_new_tokens=10)
        np.testing.assert_array_equal(batched[b, P:], alone[0, len(p):])


def test_eos_stops_rows_and_pads(gpt2, full_forward):
    tokens, _ = recompute_greedy(full_forward, PROMPTS[0], 10)
    eos = tokens[3]
    first = tokens.index(eos)
    out = bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=-1,
                            return_dict=True)
    assert out.num_new[0] == first + 1
    assert list(out.new_tokens[0, :first + 1]) == tokens[:first + 1]
    assert np.all(out.new_tokens[0, first + 1:] == -1)
    assert out.tolist(eos_id=eos)[0] == tokens[:first]


def test_sampling_top_k_1_is_greedy_and_seeded(gpt2):
    greedy = bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=8)
    top1 = bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=8, do_sample=True, top_k=1, key=3)
    np.testing.assert_array_equal(top1, greedy)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95)
    a = bigs_jax.generate(gpt2, PROMPTS, key=11, **kw)
    np.testing.assert_array_equal(a, bigs_jax.generate(gpt2, PROMPTS, key=11, **kw))
    assert not np.array_equal(a, bigs_jax.generate(gpt2, PROMPTS, key=12, **kw))


def test_sampled_frequencies_follow_the_model(gpt2, full_forward):
    """2000 one-token samples at temperature 0.7 / top-k 6 / top-p 0.9 against the warped
    distribution computed in numpy (chi-square; fails when the sampler is off)."""
    prompt, n = PROMPTS[1], 2000
    x = full_forward(prompt)[-1].astype(np.float64) / 0.7
    order = np.argsort(-x)
    probs = np.exp(x[order[:6]] - x[order[0]])
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < 0.9
    expected = np.zeros(TINY["vocab_size"])
    expected[order[:6][keep]] = probs[keep] / probs[keep].sum()
    out = bigs_jax.generate(gpt2, [prompt] * n, max_new_tokens=1, do_sample=True,
                            temperature=0.7, top_k=6, top_p=0.9, key=5)
    counts = np.bincount(out[:, -1], minlength=TINY["vocab_size"])
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    assert support.sum() >= 2
    p = stats.chisquare(counts[support], expected[support] * n).pvalue
    assert p > 1e-3, (counts[support], expected[support] * n)


def test_beam_1_is_greedy(gpt2):
    np.testing.assert_array_equal(bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=9, num_beams=1),
                                  bigs_jax.generate(gpt2, PROMPTS, max_new_tokens=9))


def test_no_recompilation_per_token_or_length(gpt2):
    """Prompt lengths within one bucket and any max_new_tokens within one buffer bucket reuse
    the compiled prefill and decode loop: every call below has prompt bucket 16 and buffer
    bucket 16 (prompt + new - 1 <= 16). A buffer past 16 (e.g. 11 + 16 - 1 = 26) is another
    bucket; an earlier case here had one and passed only when another test had compiled it."""
    bigs_jax.generate(gpt2, [[1, 2, 3]], max_new_tokens=9)
    before = (generation._prefill._cache_size(), generation._decode._cache_size())
    for prompt, n in (([4, 5, 6, 7, 8], 12), ([9] * 11, 6), ([3], 10), ([2] * 16, 1)):
        assert generation.pow2_bucket(len(prompt) + n - 1, 64) == 16
        bigs_jax.generate(gpt2, [prompt], max_new_tokens=n)
    assert (generation._prefill._cache_size(), generation._decode._cache_size()) == before


def test_refusals(gpt2):
    for encoder in (bigs_jax.create("bert-tiny", vocab_size=97),
                    bigs_jax.create("m2-bert-tiny", vocab_size=97)):
        with pytest.raises(ValueError, match="not a causal language model"):
            bigs_jax.generate(encoder, PROMPTS)
    for kw, match in ((dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(do_sample=True, num_beams=2), "beam sampling"),
                      (dict(top_p=0.0), "top_p"), (dict(early_stopping="soon"), "early_stop")):
        with pytest.raises(ValueError, match=match):
            bigs_jax.generate(gpt2, PROMPTS, **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bigs_jax.generate(gpt2, [[1, 97]])
    with pytest.raises(ValueError, match="holes"):
        bigs_jax.generate(gpt2, np.ones((1, 4), np.int32), np.array([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="empty"):
        bigs_jax.generate(gpt2, [[1], []])


@pytest.mark.parametrize("mlp", [True, False])
def test_m2_gpt_cached_greedy_equals_recompute(jitted, mlp):
    """M2-GPT's cached decoding (long-conv input cache, short-conv window) gives the tokens and,
    within FFT round-off, the logits of the full forward at every step; batched and beam
    search run through the same compiled step."""
    model = bigs_jax.create("m2-gpt-tiny", vocab_size=97, max_len=64, mlp=mlp, seed=1)
    forward = jitted(model)
    out = bigs_jax.generate(model, PROMPTS, max_new_tokens=10, output_logits=True,
                            return_dict=True)
    for b, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for g in range(10):
            block = np.zeros((1, 64), np.int32)
            block[0, :len(ids)] = ids
            step = np.asarray(forward(block).logits)[0, len(ids) - 1]
            np.testing.assert_allclose(out.logits[b, g], step, atol=1e-4, rtol=1e-4)
            ids.append(int(step.argmax()))
        assert out.tolist()[b] == ids[len(prompt):]
    beam1 = bigs_jax.generate(model, PROMPTS, max_new_tokens=10, num_beams=1)
    np.testing.assert_array_equal(beam1, out.sequences)
    beams = bigs_jax.generate(model, PROMPTS, max_new_tokens=6, num_beams=3, return_dict=True)
    assert np.all(beams.scores <= 0) and np.all(beams.num_new == 6)


def test_bigs_lm_recurrent_generate_equals_recompute(jitted):
    """The causal gated-SSM LM decodes with its recurrent state: greedy tokens and logits are
    the full forward's (recomputed over the whole prefix each step, 1e-5); a left-padded batch
    gives each prompt's tokens alone; top-k 1 sampling and 1 beam are greedy; beam search's
    score is the recomputed mean log-probability of its returned tokens."""
    model = bigs_jax.create("bigs-lm-tiny", vocab_size=97, max_len=64, seed=1,
                            tie_word_embeddings=False, init_std=0.2)
    forward = jitted(model)

    def full(ids):
        block = np.zeros((1, 64), np.int32)
        block[0, :len(ids)] = ids
        return np.asarray(forward(block).logits)[0, :len(ids)]

    out = bigs_jax.generate(model, PROMPTS, max_new_tokens=10, output_logits=True,
                            return_dict=True)
    for b, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for g in range(10):
            step = full(ids)[-1]
            np.testing.assert_allclose(out.logits[b, g], step, atol=1e-5, rtol=0)
            ids.append(int(step.argmax()))
        assert out.tolist()[b] == ids[len(prompt):]
    assert len({t for row in out.tolist() for t in row}) > 5  # not a trivial repetition
    P = max(map(len, PROMPTS))
    block, mask = np.full((3, P), 7, np.int32), np.zeros((3, P), np.int32)
    for b, p in enumerate(PROMPTS):
        block[b, P - len(p):], mask[b, P - len(p):] = p, 1
    left = bigs_jax.generate(model, block, mask, max_new_tokens=10)
    np.testing.assert_array_equal(left[:, P:], out.new_tokens)
    for b, p in enumerate(PROMPTS):
        alone = bigs_jax.generate(model, [p], max_new_tokens=10)
        np.testing.assert_array_equal(alone[0, len(p):], out.new_tokens[b])
    np.testing.assert_array_equal(bigs_jax.generate(model, PROMPTS, max_new_tokens=10,
                                                    do_sample=True, top_k=1), out.sequences)
    np.testing.assert_array_equal(bigs_jax.generate(model, PROMPTS, max_new_tokens=10,
                                                    num_beams=1), out.sequences)
    beams = bigs_jax.generate(model, PROMPTS, max_new_tokens=6, num_beams=3, return_dict=True)
    for b, prompt in enumerate(PROMPTS):
        new = beams.tolist()[b]
        assert len(new) == 6
        logp = full(list(prompt) + new).astype(np.float64)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        want = sum(logp[len(prompt) - 1 + g, t] for g, t in enumerate(new)) / 6
        np.testing.assert_allclose(beams.scores[b], want, atol=1e-4)
