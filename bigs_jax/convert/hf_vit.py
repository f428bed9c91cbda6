"""HF ViT (`ViTForImageClassification`, `ViTModel`) ↔ our ViT (`pool="cls"`).

The patch projection is a torch `Conv2d` with weight (D, C, P, P); ours is the same stride-P
convolution stored (P, P, C, D) (Flax/big_vision layout). The [CLS] token (1, 1, D) and the
position table (1, N+1, D) lose their leading singleton axes. A `ViTModel` directory (no
classifier) imports with a fresh zero head; HF's pooler (`add_pooling_layer`, absent from
`ViTForImageClassification`) is not part of our ViT and is refused. Export always writes
`ViTForImageClassification`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from bigs_jax.convert.common import (
    ConversionError,
    Imported,
    KeyMap,
    Rule,
    Tensors,
    Transform,
    abstract_params,
    linear,
    norm,
    read_hf_weights,
    read_json,
    strip_prefix,
)
from bigs_jax.layers.linear import ACTIVATIONS
from bigs_jax.models.vit import ViTConfig

FORMAT = "hf-vit"
PREFIX = "vit."

# Conv2d weight (D, C, P, P) ↔ our patch kernel (P, P, C, D).
CONV2D = Transform("conv2d", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
# (1, 1, D) / (1, N, D) ↔ (D,) / (N, D).
UNBATCH = Transform("unbatch", lambda w: w[0, 0] if w.shape[:2] == (1, 1) else w[0],
                    lambda x: x.reshape((1,) * (3 - x.ndim) + x.shape))

_LAYER, _OURS = "encoder.layer.{i}", "layers/{i}"
KEY_MAP = KeyMap((
    Rule("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", CONV2D),
    Rule("embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
    Rule("embeddings.cls_token", "cls", UNBATCH),
    Rule("embeddings.position_embeddings", "position", UNBATCH),
    *norm(f"{_LAYER}.layernorm_before", f"{_OURS}/mixer_norm"),
    *(r for p in ("query", "key", "value")
      for r in linear(f"{_LAYER}.attention.attention.{p}", f"{_OURS}/mixer/{p}")),
    *linear(f"{_LAYER}.attention.output.dense", f"{_OURS}/mixer/out"),
    *norm(f"{_LAYER}.layernorm_after", f"{_OURS}/mlp_norm"),
    *linear(f"{_LAYER}.intermediate.dense", f"{_OURS}/mlp/up"),
    *linear(f"{_LAYER}.output.dense", f"{_OURS}/mlp/down"),
    *norm("layernorm", "final_norm"),
    *linear("classifier", "head"),
))


def detect(src: str) -> bool:
    path = os.path.join(src, "config.json")
    return os.path.exists(path) and read_json(path).get("model_type") == "vit"


def config_from_hf(hf: Mapping[str, Any], config_path: str) -> ViTConfig:
    """Our ViT config for an HF ViTConfig dict (HF defaults for absent keys)."""
    if hf.get("model_type", "vit") != "vit":
        raise ConversionError(f"{config_path} has model_type {hf.get('model_type')!r}, not "
                              "'vit'; use --from auto (or --from hf) for this checkpoint")
    act = hf.get("hidden_act", "gelu")
    problems = [f"{k} {v!r}" for k, v, ok in (
        ("hidden_act", act, act in ACTIVATIONS),
        ("qkv_bias", hf.get("qkv_bias", True), hf.get("qkv_bias", True)),
    ) if not ok]
    if problems:
        raise ConversionError(f"{config_path}: {', '.join(problems)} not supported")
    labels = hf.get("id2label")
    return ViTConfig(
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
        num_channels=hf.get("num_channels", 3), hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072), hidden_act=act,
        norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        init_std=hf.get("initializer_range", 0.02), pool="cls",
        num_labels=len(labels) if labels else hf.get("num_labels", 2))


def import_checkpoint(src: str, options: Mapping[str, Any]) -> Imported:
    """Read an HF ViT directory into (our config, our flat params)."""
    del options
    config_path = os.path.join(src, "config.json")
    config = config_from_hf(read_json(config_path), config_path)
    tensors, filename = read_hf_weights(src)
    if any(k.startswith("pooler.") or ".pooler." in k for k in tensors):
        raise ConversionError(f"{os.path.join(src, filename)} has a ViT pooler "
                              "(ViTModel(add_pooling_layer=True)); our ViT has none: save the "
                              "ViTForImageClassification or a ViTModel without pooler")
    tensors = strip_prefix(tensors, PREFIX)
    notes = []
    _, target = abstract_params(config)
    if "classifier.weight" not in tensors:  # a bare ViTModel: start the head from zeros
        tensors = {**tensors, "classifier.weight": np.zeros(target["head/kernel"][::-1],
                                                            np.float32),
                   "classifier.bias": np.zeros(target["head/bias"], np.float32)}
        notes.append("no classifier in the checkpoint: the head starts from zeros")
    params = KEY_MAP.to_ours(tensors, target, source=os.path.join(src, filename))
    return Imported(config, params, FORMAT, notes)


def hf_config(config: ViTConfig) -> dict:
    """The HF config.json of one of our ViT models."""
    if config.pool != "cls":
        raise ConversionError(f"HF ViT pools the [CLS] token; a pool={config.pool!r} model has "
                              "no HF equivalent")
    if {config.qk_head_dim, config.v_head_dim} - {None, config.hidden_size // config.num_heads}:
        raise ConversionError("HF ViT has head dims hidden_size // num_heads; this model's "
                              "(changed, e.g. by growth) have no HF equivalent")
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "image_size": config.image_size, "patch_size": config.patch_size,
        "num_channels": config.num_channels, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
        "layer_norm_eps": config.norm_eps, "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": config.init_std, "qkv_bias": True,
        "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(config.num_labels)},
        "torch_dtype": "float32",
    }


def export_tensors(config: ViTConfig, params: Mapping) -> Tensors:
    """HF `ViTForImageClassification` state-dict tensors of our flat params."""
    del config
    tensors = KEY_MAP.to_foreign(params)
    return {k if k.startswith("classifier.") else PREFIX + k: np.ascontiguousarray(v)
            for k, v in tensors.items()}
