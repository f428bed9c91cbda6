"""Text generation for the zoo's causal models: greedy, sampling and beam search with a cache.

    import bigs_jax
    model = bigs_jax.load("WORKDIR")                       # GPT-2, M2-GPT or bigs-lm
    ids = bigs_jax.generate(model, [[464, 3290, 318], [40]], max_new_tokens=32, eos_id=50256)
    new = ids[:, 3:]                                       # (B, P + G): prompts, then new tokens
    out = bigs_jax.generate(model, ids_BP, attention_mask=mask_BP, do_sample=True, top_p=0.9,
                            temperature=0.8, key=jax.random.key(0), return_dict=True)
    out = bigs_jax.generate(model, prompts, num_beams=4, length_penalty=1.0, eos_id=50256)

Prompts are lists of token ids of any lengths, or a (B, P) array with an attention mask whose
ones are one run per row (left or right padding). Inside, every prompt is right-aligned at
position 0 in a right-padded block, so a row's tokens keep the positions they have alone and
a batch gives each row exactly the tokens it gets on its own.

How it runs: one compiled *prefill* puts the prompts through the model, filling the model's
decoding cache (GPT-2: keys and values; M2-GPT: the long-convolution inputs, see
`models.m2`; bigs-lm: one recurrent SSM state per layer, see `models.bigs_lm`) and giving
the first next-token logits; one compiled *decode loop* (a `lax.while_loop` whose body is
one cached decode step of every row, then token selection) runs until every row has stopped
(eos, or `max_new_tokens`). Shapes are bucketed to powers of two (prompt block, cache
length, token buffer), so new prompt lengths or `max_new_tokens` within a bucket compile
nothing; the sampling numbers (temperature, top-p, length penalty,
eos, pad) are traced values, never compile-time constants.

Strategies (HF `generate` semantics):
- greedy (default): argmax of the logits.
- sampling (`do_sample=True`): logits / temperature, then top-k, then top-p (nucleus: the
  smallest set of most likely tokens whose mass reaches top_p), then a categorical draw from
  `key` folded with the step; the same key gives the same tokens.
- beam search (`num_beams > 1`): HF's vectorized beam search (2·num_beams candidates per
  step, hypotheses ending in eos scored by sum log p / generated_length ** length_penalty,
  `early_stopping` True / False / "never" as in HF), so the returned ids equal
  `transformers`' `generate(num_beams=...)` for the same model and settings.

A batch stops growing when its longest prompt reaches the model's max_len (positions beyond
it do not exist). `python -m bigs_jax.generate WORKDIR --prompt ...` is the command line.

Dimension key: B batch, P prompt block, L bucketed prompt length, S cache length, T token
buffer, G generated length, C vocab, N beams.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16
NEG = -1.0e9  # HF's "impossible" score in beam search; the same constant keeps ties identical


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What `generate(..., return_dict=True)` returns.

    Attributes:
      sequences: (B, P + G) int32: the prompt block as given (a ragged list right-padded with
        pad_id), then the G new tokens; pad_id after a row stops (its eos included).
      prompt_len: P.
      num_new: (B,) new tokens of each row (its eos included).
      scores: beam search: (B,) the returned hypothesis' score (HF `sequences_scores`).
      logits: with `output_logits=True` (greedy and sampling): (B, G, C) fp32 raw logits
        that chose each new token.
    """

    sequences: np.ndarray
    prompt_len: int
    num_new: np.ndarray
    scores: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None

    @property
    def new_tokens(self) -> np.ndarray:
        """(B, G) the new tokens, pad_id after each row's end."""
        return self.sequences[:, self.prompt_len:]

    def tolist(self, eos_id: Optional[int] = None) -> list[list[int]]:
        """Each row's new tokens, without pads (and without a final `eos_id`)."""
        out = []
        for row, n in zip(self.new_tokens, self.num_new):
            ids = [int(t) for t in row[:n]]
            out.append(ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids)
        return out


@dataclasses.dataclass(frozen=True)
class _Static:
    """The compile-time settings of the decode loop."""

    mode: str          # greedy | sample | beam
    buffer: int        # T, token slots
    cache_len: int     # S
    top_k: int
    top_p: bool        # nucleus filtering on
    num_beams: int
    early_stopping: Union[bool, str]
    output_logits: bool


def pow2_bucket(n: int, cap: int) -> int:
    """The smallest power of two ≥ max(n, MIN_BUCKET), capped at `cap`."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def can_generate(model) -> bool:
    """Whether `model` is a causal LM with a decoding cache (GPT-2, M2-GPT, bigs-lm)."""
    return callable(getattr(model, "decode_step", None)) and getattr(model, "can_generate", True)


# ---------------------------------------------------------------------------- prompts


def _rows(prompt_ids, attention_mask) -> tuple[np.ndarray, list[np.ndarray], bool]:
    """(prompt block (B, P), each row's real tokens, whether the block came from a list)."""
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not np.isscalar(prompt_ids[0]):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a (B, P) array of prompts; a list of "
                             "prompts of different lengths needs none")
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
        block = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
        for b, r in enumerate(rows):
            block[b, :len(r)] = r
        return block, rows, True
    block = np.asarray(prompt_ids)
    if block.ndim == 1:
        block = block[None, :]
    if block.ndim != 2 or block.shape[0] == 0 or not np.issubdtype(block.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a list of token-id lists or a (B, P) int array, "
                         f"got shape {block.shape} dtype {block.dtype}")
    if attention_mask is None:
        return block, list(block), False
    mask = np.asarray(attention_mask).astype(bool)
    if mask.size != block.size:
        raise ValueError(f"attention_mask has shape {mask.shape} but prompt_ids has shape "
                         f"{block.shape}; pass one mask value per prompt token")
    mask = mask.reshape(block.shape)
    rows = []
    for b, m in enumerate(mask):
        real = np.flatnonzero(m)
        if real.size and real[-1] - real[0] + 1 != real.size:
            raise ValueError(f"attention_mask row {b} has holes; pad on the left or on the "
                             "right only")
        rows.append(block[b, real])
    return block, rows, False


def _check_prompts(rows: list[np.ndarray], vocab_size: int, max_len: int) -> None:
    if not rows:
        raise ValueError("no prompts: pass at least one")
    for b, r in enumerate(rows):
        if not r.size:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token "
                             "(e.g. the end-of-text id as a start token)")
        if r.min() < 0 or r.max() >= vocab_size:
            raise ValueError(f"prompt {b} holds ids outside the vocabulary [0, {vocab_size}); "
                             "tokenize with the model's vocabulary")
        if r.size > max_len:
            raise ValueError(f"prompt {b} has {r.size} tokens, more than the model's max_len "
                             f"{max_len}; shorten it")


def _check_settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                    early_stopping) -> None:
    problems = [
        (max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (num_beams < 1, f"num_beams must be >= 1, got {num_beams}"),
        (do_sample and num_beams > 1, "beam sampling is not supported; use do_sample=True "
                                      "with num_beams=1, or beam search without sampling"),
        (do_sample and not temperature > 0, f"temperature must be > 0, got {temperature}"),
        (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (early_stopping not in (True, False, "never"),
         f"early_stopping must be True, False or 'never', got {early_stopping!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


# ---------------------------------------------------------------------------- compiled parts


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, ids_BL, lengths_B, cache_len: int):
    model = nnx.merge(graphdef, state)
    return model.prefill(ids_BL, lengths_B, model.init_cache(ids_BL.shape[0], cache_len))


def _warp(logits_BC, static: _Static, dyn: dict):
    """Sampling logits: / temperature, then top-k, then top-p (others -inf)."""
    x_BC = logits_BC / dyn["temperature"]
    if static.top_k:
        kth_B1 = jax.lax.top_k(x_BC, min(static.top_k, x_BC.shape[-1]))[0][:, -1:]
        x_BC = jnp.where(x_BC < kth_B1, -jnp.inf, x_BC)
    if static.top_p:
        sorted_BC = -jnp.sort(-x_BC, axis=-1)
        probs_BC = jax.nn.softmax(sorted_BC, axis=-1)
        before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC   # mass of the likelier tokens
        keep_BC = before_BC < dyn["top_p"]
        keep_BC = keep_BC.at[:, 0].set(True)
        threshold_B1 = jnp.min(jnp.where(keep_BC, sorted_BC, jnp.inf), axis=-1, keepdims=True)
        x_BC = jnp.where(x_BC < threshold_B1, -jnp.inf, x_BC)
    return x_BC


def _choose(logits_BC, g, static: _Static, dyn: dict):
    if static.mode == "greedy":
        return jnp.argmax(logits_BC, axis=-1).astype(jnp.int32)
    x_BC = _warp(logits_BC, static, dyn)
    keys = jax.random.split(jax.random.fold_in(dyn["key"], g), x_BC.shape[0])
    return jax.vmap(jax.random.categorical)(keys, x_BC).astype(jnp.int32)


def _sample_loop(model, static: _Static, cache, logits_BC, lengths_B, dyn, consts):
    """Greedy or sampled continuation of every row; returns (tokens (B, T), counts (B,),
    logits (B, T, C) or None)."""
    B, T = lengths_B.shape[0], static.buffer
    tok_B = _choose(logits_BC, 0, static, dyn)
    tokens_BT = jnp.full((B, T), dyn["pad"], jnp.int32).at[:, 0].set(tok_B)
    logits_BTC = (jnp.zeros((B, T, logits_BC.shape[-1]), jnp.float32).at[:, 0].set(logits_BC)
                  if static.output_logits else None)
    done_B = tok_B == dyn["eos"]
    count_B = jnp.ones((B,), jnp.int32)

    def cond(carry):
        g, _, done_B, *_ = carry
        return (g < dyn["max_new"]) & ~jnp.all(done_B)

    def body(carry):
        g, tok_B, done_B, count_B, tokens_BT, logits_BTC, cache = carry
        logits_BC, cache = model.decode_step(tok_B, lengths_B + g - 1, cache, consts)
        new_B = jnp.where(done_B, dyn["pad"], _choose(logits_BC, g, static, dyn))
        tokens_BT = tokens_BT.at[:, g].set(new_B)
        if logits_BTC is not None:
            logits_BTC = logits_BTC.at[:, g].set(logits_BC)
        count_B = count_B + (~done_B).astype(jnp.int32)
        done_B = done_B | (new_B == dyn["eos"])
        return g + 1, new_B, done_B, count_B, tokens_BT, logits_BTC, cache

    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), tok_B, done_B, count_B, tokens_BT,
                                            logits_BTC, cache))
    return carry[4], carry[3], carry[5]


# ---------------------------------------------------------------------------- beam search


def _gather(x, idx_BK):
    """x (B, N, ...) at beams idx (B, K) -> (B, K, ...)."""
    idx = idx_BK.reshape(*idx_BK.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, idx, axis=1)


def _beam_select(st: dict, logits_BNC, g, static: _Static, dyn: dict) -> dict:
    """One step of HF's beam search (transformers 4.57 `_beam_search`, steps b–g) at
    generated length g: the best continuations of the running beams, the finished
    hypotheses' update and the early-stopping heuristic."""
    B, N, C = logits_BNC.shape
    K = 2 * N
    acc_BNC = jax.nn.log_softmax(logits_BNC, axis=-1) + st["run_scores"][:, :, None]
    top_lp_BK, top_idx_BK = jax.lax.top_k(acc_BNC.reshape(B, N * C), K)
    beam_BK, tok_BK = top_idx_BK // C, (top_idx_BK % C).astype(jnp.int32)
    seqs_BKT = _gather(st["run_seqs"], beam_BK).at[:, :, g].set(tok_BK)
    hits_BK = (tok_BK == dyn["eos"]) | (g + 1 >= dyn["max_new"])
    # running beams for the next step: the best N candidates that did not stop
    run_lp_BK = top_lp_BK + hits_BK.astype(jnp.float32) * NEG
    nxt_BN = jax.lax.top_k(run_lp_BK, N)[1]
    # finished hypotheses: the top N candidates that stopped, length-penalized
    just_BK = hits_BK & (jnp.arange(K) < N)[None, :]
    fin_BK = top_lp_BK / (g + 1).astype(jnp.float32) ** dyn["length_penalty"]
    full_B1 = jnp.all(st["finished"], axis=-1, keepdims=True) & (static.early_stopping is True)
    fin_BK = fin_BK + full_B1.astype(jnp.float32) * NEG
    fin_BK = fin_BK + (~st["improvable"]).astype(jnp.float32) * NEG
    fin_BK = fin_BK + (~just_BK).astype(jnp.float32) * NEG
    merged = jax.lax.top_k(jnp.concatenate([st["scores"], fin_BK], axis=1), N)[1]
    cat = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), merged)
    out = dict(
        run_seqs=_gather(seqs_BKT, nxt_BN), run_scores=_gather(run_lp_BK, nxt_BN),
        src_BN=_gather(beam_BK, nxt_BN), tok_BN=_gather(tok_BK, nxt_BN),
        seqs=cat(st["seqs"], seqs_BKT), scores=cat(st["scores"], fin_BK),
        lens=cat(st["lens"], jnp.broadcast_to(g + 1, (B, K)).astype(jnp.int32)),
        finished=cat(st["finished"], just_BK))
    if static.early_stopping == "never":
        best_len = jnp.where(dyn["length_penalty"] > 0, dyn["max_new"], g + 1)
    else:
        best_len = g + 1
    best_B1 = out["run_scores"][:, :1] / best_len.astype(jnp.float32) ** dyn["length_penalty"]
    worst_BN = jnp.where(out["finished"], jnp.min(out["scores"], axis=1, keepdims=True), NEG)
    out["improvable"] = st["improvable"] & jnp.any(best_B1 > worst_BN, axis=-1, keepdims=True)
    out["go_on"] = (jnp.any(out["improvable"])
                    & ~(jnp.all(out["finished"]) & (static.early_stopping is True))
                    & ~jnp.all(hits_BK))
    return out


def _beam_loop(model, static: _Static, cache, logits_BC, lengths_B, dyn, consts):
    """Beam search from the prefill of B rows; returns (best tokens (B, T), their lengths,
    their scores)."""
    B, N, T = lengths_B.shape[0], static.num_beams, static.buffer
    repeat = lambda x: jnp.repeat(x, N, axis=0)
    cache = jax.tree.map(repeat, cache)
    lengths_R = repeat(lengths_B)  # R = B·N rows, row b's beams together
    st = dict(run_seqs=jnp.full((B, N, T), dyn["pad"], jnp.int32),
              run_scores=jnp.zeros((B, N), jnp.float32).at[:, 1:].set(NEG),
              seqs=jnp.full((B, N, T), dyn["pad"], jnp.int32),
              scores=jnp.full((B, N), NEG, jnp.float32), lens=jnp.zeros((B, N), jnp.int32),
              finished=jnp.zeros((B, N), bool), improvable=jnp.ones((B, 1), bool))
    st = _beam_select(st, repeat(logits_BC).reshape(B, N, -1), jnp.int32(0), static, dyn)

    def reorder(cache, st):
        rows_R = (jnp.arange(B)[:, None] * N + st["src_BN"]).reshape(-1)
        return jax.tree.map(lambda c: c[rows_R], cache)

    def cond(carry):
        g, st, _ = carry
        return (g < dyn["max_new"]) & st["go_on"]

    def body(carry):
        g, st, cache = carry
        logits_RC, cache = model.decode_step(st["tok_BN"].reshape(-1), lengths_R + g - 1,
                                             cache, consts)
        st = _beam_select(st, logits_RC.reshape(B, N, -1), g, static, dyn)
        return g + 1, st, reorder(cache, st)

    _, st, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), st, reorder(cache, st)))
    return st["seqs"][:, 0], st["lens"][:, 0], st["scores"][:, 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(graphdef, static: _Static, state, cache, logits_BC, lengths_B, dyn):
    model = nnx.merge(graphdef, state)
    consts = model.decode_constants(static.cache_len)
    if static.mode == "beam":
        tokens, counts, scores = _beam_loop(model, static, cache, logits_BC, lengths_B, dyn,
                                            consts)
        return tokens, counts, scores, None
    tokens, counts, logits = _sample_loop(model, static, cache, logits_BC, lengths_B, dyn,
                                          consts)
    return tokens, counts, None, logits


# ---------------------------------------------------------------------------- the API


def generate(
    model,
    prompt_ids: Union[Sequence[Sequence[int]], np.ndarray, jax.Array],
    attention_mask: Optional[Any] = None,
    *,
    max_new_tokens: int = 32,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    key: Union[int, jax.Array, None] = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    output_logits: bool = False,
    return_dict: bool = False,
) -> Union[np.ndarray, GenerateOutput]:
    """Continue each prompt with up to `max_new_tokens` tokens (module docstring).

    Args:
      model: a causal LM of the zoo (GPT-2, M2-GPT, bigs-lm); others raise ValueError.
      prompt_ids: a list of token-id lists (any lengths), or a (B, P) int array (one prompt
        as a 1-D array).
      attention_mask: with an array: (B, P), 1 on each row's tokens, one run per row (left
        or right padding); None means every position is a token.
      max_new_tokens: most new tokens per row.
      eos_id: a row stops after producing it (kept in the output); None: never.
      pad_id: fills the output after a row stops (and right-pads a ragged list).
      do_sample: sample instead of greedy; temperature, top_k (0 = off) and top_p (1 = off)
        shape the distribution; `key` (a jax key or an int seed; default 0) makes it
        reproducible.
      num_beams: > 1 for beam search, with HF's `length_penalty` and `early_stopping`.
      output_logits: also return each step's raw logits (greedy and sampling).
      return_dict: return a `GenerateOutput` instead of its `sequences`.

    Returns:
      (B, P + G) int32 ids: the prompt block as given, then the new tokens (pad_id after a
      row's end), G the longest row's new-token count; or a `GenerateOutput`.
    """
    if not can_generate(model):
        raise ValueError(f"{type(model).__name__} cannot generate text: it is not a causal "
                         "language model with an LM head; use a GPT-2, M2-GPT or bigs-lm model")
    _check_settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
                    early_stopping)
    c = model.config
    block, rows, _ = _rows(prompt_ids, attention_mask)
    _check_prompts(rows, c.vocab_size, c.max_len)
    lengths = np.asarray([len(r) for r in rows], np.int32)
    longest = int(lengths.max())
    # token g is predicted from position n + g - 1, which must exist
    max_new = min(max_new_tokens, c.max_len - longest + 1)
    L = pow2_bucket(longest, c.max_len)
    S = max(L, pow2_bucket(longest + max_new - 1, c.max_len))
    ids = np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    graphdef, state = nnx.split(model)
    logits_BC, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths), S)
    mode = "beam" if num_beams > 1 else "sample" if do_sample else "greedy"
    static = _Static(mode=mode, buffer=pow2_bucket(max_new, 1 << 30), cache_len=S,
                     top_k=int(top_k),
                     top_p=do_sample and top_p < 1, num_beams=int(num_beams),
                     early_stopping=early_stopping, output_logits=output_logits and
                     mode != "beam")
    if key is None or isinstance(key, int):
        key = jax.random.key(key or 0)
    dyn = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
               length_penalty=jnp.float32(length_penalty), max_new=jnp.int32(max_new),
               eos=jnp.int32(-1 if eos_id is None else eos_id), pad=jnp.int32(pad_id), key=key)
    tokens, counts, scores, logits = jax.device_get(
        _decode(graphdef, static, state, cache, logits_BC, jnp.asarray(lengths), dyn))
    G = int(counts.max())
    out = GenerateOutput(
        sequences=np.concatenate([block.astype(np.int32), tokens[:, :G]], axis=1),
        prompt_len=block.shape[1], num_new=counts, scores=scores,
        logits=None if logits is None else logits[:, :G])
    return out if return_dict else out.sequences
