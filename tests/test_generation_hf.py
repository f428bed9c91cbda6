"""bigs_jax.generate against transformers' GPT2LMHeadModel.generate (PyTorch) on converted tiny
random GPT-2s: greedy and beam-search ids (and beam scores) equal, prompts batched with mixed
lengths on our side and one at a time on HF's."""

import numpy as np
import pytest

import bigs_jax
from bigs_jax.convert.common import convert
from tests.convert.tiny_hf import save_tiny, torch, transformers as tr

EOS_STEP = 1
PROMPTS = [[5, 17, 3, 44, 41], [9, 2, 60, 33, 7, 12, 21, 8], [44]]
SHAPES = [  # (n_embd, n_layer, n_head, n_inner, tied)
    dict(n_embd=24, n_layer=2, n_head=2, n_inner=None, tie_word_embeddings=True),
    dict(n_embd=32, n_layer=3, n_head=4, n_inner=40, tie_word_embeddings=False),
]
BEAMS = [  # (num_beams, length_penalty, early_stopping)
    (3, 1.0, False),
    (4, 2.0, True),
    (2, 0.5, "never"),
    (3, -1.0, False),
]


@pytest.fixture(scope="module", params=range(len(SHAPES)))
def pair(request, tmp_path_factory):
    """(HF model, our converted model) of one tiny random GPT-2 shape."""
    root = tmp_path_factory.mktemp("gpt2")
    config = tr.GPT2Config(vocab_size=61, n_positions=48, **SHAPES[request.param])
    hf = save_tiny(tr.GPT2LMHeadModel, config, str(root / "hf"), seed=request.param)
    convert(str(root / "hf"), str(root / "ours"))
    return hf, bigs_jax.load(str(root / "ours"))


def hf_generate(hf, prompt, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                             dtype=torch.long),
                          do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_scores=True, **kw)
    return out.sequences[0, len(prompt):].tolist(), getattr(out, "sequences_scores", None)


def trimmed(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def eos_of(hf):
    """An end-of-text id the model actually produces early: greedy's third token for the
    first prompt, so some hypotheses finish before max_new_tokens."""
    return hf_generate(hf, PROMPTS[0], max_new_tokens=3)[0][EOS_STEP]


def test_greedy_equals_hf(pair):
    hf, ours = pair
    eos = eos_of(hf)
    out = bigs_jax.generate(ours, PROMPTS, max_new_tokens=12, eos_id=eos, return_dict=True)
    for b, prompt in enumerate(PROMPTS):
        ref, _ = hf_generate(hf, prompt, max_new_tokens=12, eos_token_id=eos)
        assert out.tolist()[b] == trimmed(ref, eos), b


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", BEAMS)
def test_beam_search_equals_hf(pair, num_beams, length_penalty, early_stopping):
    hf, ours = pair
    eos = eos_of(hf)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty,
              early_stopping=early_stopping)
    out = bigs_jax.generate(ours, PROMPTS, max_new_tokens=10, eos_id=eos, return_dict=True,
                            **kw)
    for b, prompt in enumerate(PROMPTS):
        ref, score = hf_generate(hf, prompt, max_new_tokens=10, eos_token_id=eos, **kw)
        assert out.tolist()[b] == trimmed(ref, eos), (b, out.tolist()[b], ref)
        np.testing.assert_allclose(out.scores[b], float(score[0]), rtol=1e-5, atol=1e-6)


def test_beam_cases_reach_eos(pair):
    """The cases above include hypotheses ended by eos (the finished-hypothesis path)."""
    hf, ours = pair
    eos = eos_of(hf)
    lengths = np.concatenate([bigs_jax.generate(
        ours, PROMPTS, max_new_tokens=10, eos_id=eos, return_dict=True, num_beams=n,
        length_penalty=lp, early_stopping=es).num_new for n, lp, es in BEAMS])
    assert (lengths < 10).any(), lengths
