"""HF GPT-2 (`GPT2Model`, `GPT2LMHeadModel`) ↔ our GPT-2.

HF GPT-2 uses `Conv1D` layers whose weights are already (in, out), so kernels copy as they
are; the fused `c_attn` (D, 3D) splits into our query, key and value. `lm_head.weight` is read
only for untied models (`tie_word_embeddings: false`); a tied model's head is the token
embedding. Export always writes `GPT2LMHeadModel`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from bigs_jax.convert.common import (
    SPLIT3,
    TRANSPOSE,
    ConversionError,
    Imported,
    KeyMap,
    Rule,
    Tensors,
    abstract_params,
    conv1d,
    norm,
    read_hf_weights,
    read_json,
    strip_prefix,
)
from bigs_jax.layers.linear import ACTIVATIONS
from bigs_jax.models.gpt2 import GPT2Config

FORMAT = "hf-gpt2"
PREFIX = "transformer."

_LAYER, _OURS = "h.{i}", "layers/{i}"
KEY_MAP = KeyMap((
    Rule("wte.weight", "embeddings/word/embedding"),
    Rule("wpe.weight", "embeddings/position/embedding"),
    *norm(f"{_LAYER}.ln_1", f"{_OURS}/mixer_norm"),
    Rule(f"{_LAYER}.attn.c_attn.weight", tuple(f"{_OURS}/mixer/{p}/kernel"
                                               for p in ("query", "key", "value")), SPLIT3),
    Rule(f"{_LAYER}.attn.c_attn.bias", tuple(f"{_OURS}/mixer/{p}/bias"
                                             for p in ("query", "key", "value")), SPLIT3),
    *conv1d(f"{_LAYER}.attn.c_proj", f"{_OURS}/mixer/out"),
    *norm(f"{_LAYER}.ln_2", f"{_OURS}/mlp_norm"),
    *conv1d(f"{_LAYER}.mlp.c_fc", f"{_OURS}/mlp/up"),
    *conv1d(f"{_LAYER}.mlp.c_proj", f"{_OURS}/mlp/down"),
    *norm("ln_f", "final_norm"),
    Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE),
), ignore=(
    r"h\.\d+\.attn\.(bias|masked_bias)",  # causal-mask buffers older checkpoints saved
))


def detect(src: str) -> bool:
    path = os.path.join(src, "config.json")
    return os.path.exists(path) and read_json(path).get("model_type") == "gpt2"


def config_from_hf(hf: Mapping[str, Any], config_path: str) -> GPT2Config:
    """Our GPT-2 config for an HF GPT2Config dict (HF defaults for absent keys)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"{config_path} has model_type {hf.get('model_type')!r}, not "
                              "'gpt2'; use --from auto (or --from hf) for this checkpoint")
    unsupported = [k for k, bad in (("scale_attn_weights", not hf.get("scale_attn_weights", True)),
                                    ("scale_attn_by_inverse_layer_idx",
                                     hf.get("scale_attn_by_inverse_layer_idx", False)),
                                    ("add_cross_attention", hf.get("add_cross_attention", False)))
                   if bad]
    if unsupported:
        raise ConversionError(f"{config_path}: {', '.join(unsupported)} not supported; only "
                              "the standard GPT-2 attention converts")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{config_path}: activation_function {act!r} is not supported; "
                              f"choose one of {sorted(ACTIVATIONS)}")
    return GPT2Config(
        vocab_size=hf.get("vocab_size", 50257),
        max_len=hf.get("n_positions", 1024),
        hidden_size=hf.get("n_embd", 768),
        num_layers=hf.get("n_layer", 12),
        num_heads=hf.get("n_head", 12),
        intermediate_size=hf.get("n_inner"),
        hidden_act=act,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True))


def import_checkpoint(src: str, options: Mapping[str, Any]) -> Imported:
    """Read an HF GPT-2 directory into (our config, our flat params)."""
    del options
    config_path = os.path.join(src, "config.json")
    config = config_from_hf(read_json(config_path), config_path)
    tensors, filename = read_hf_weights(src)
    tensors = strip_prefix(tensors, PREFIX)
    key_map = KEY_MAP
    if config.tie_word_embeddings:
        key_map = key_map.with_ignored(r"lm_head\.weight")  # transformers ties it to wte too
    _, target = abstract_params(config)
    params = key_map.to_ours(tensors, target, source=os.path.join(src, filename))
    return Imported(config, params, FORMAT)


def hf_config(config: GPT2Config) -> dict:
    """The HF config.json of one of our GPT-2 models."""
    if config.hidden_act not in ("gelu_new", "gelu", "relu"):
        raise ConversionError(f"hidden_act {config.hidden_act!r} has no HF GPT-2 equivalent")
    head_dim = config.hidden_size // config.num_heads
    if config.norm != "layer" or {config.qk_head_dim, config.v_head_dim} - {None, head_dim}:
        raise ConversionError("HF GPT-2 has LayerNorm and head dims hidden_size // num_heads; "
                              "this model (norm or head dims changed, e.g. by growth) has no "
                              "HF equivalent")
    out = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_len,
        "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_heads,
        "n_inner": config.intermediate_size, "activation_function": config.hidden_act,
        "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.attention_dropout,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32",
    }
    if config.vocab_size == 50257:  # the OpenAI BPE vocabulary: <|endoftext|> is the last id
        out.update(bos_token_id=50256, eos_token_id=50256)
    return out


def export_tensors(config: GPT2Config, params: Mapping) -> Tensors:
    """HF `GPT2LMHeadModel` state-dict tensors of our flat params."""
    tensors = KEY_MAP.to_foreign(params)
    return {k if k.startswith("lm_head.") else PREFIX + k: v for k, v in tensors.items()}
