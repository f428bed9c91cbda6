"""Official BiGS checkpoints (Flax msgpack and the PyTorch port) → our gated+ssm encoder.

The JunxiongWang/BiGS_{128,512,1024,4096} checkpoints (and the `*_MNLI` sequence-classification
ones) come as `flax_model.msgpack` (FlaxBiGSForMaskedLM / ...ForSequenceClassification) and,
for some, a PyTorch port's `pytorch_model.bin`, each beside an HF-style config.json
(research/bigs.md §1.3–1.6). Our gated+ssm encoder keeps the official layer-internal names
(`dv`, `du_forward`, `fs4`, ...), so both tables only rename containers; the PyTorch port also
stores Linear weights (out, in) and nests the SSM parameters under `fs4.kernel.*`.

The model config comes from config.json: `max_position_embeddings` is the length the
position table holds, `pooler_type` picks the pooler (BiGS_128 says "mean"; the others omit
it, so BiGSConfig's default "non_padding_mean" applies), `pre_norm`, `num_ssm` and
`layer_norm_eps` carry over. The head follows the tensors: `classifier` → classification,
`cls/predictions` → MLM with the decoder tied to the word embeddings, neither → none.

Padding: by default the converted model is padding-correct (the zoo's rule: pads never reach
real tokens). The official code lets pads leak into the backward SSM; `official_padding=True`
(`--official-padding`) reproduces that exactly, e.g. to match reported fine-tuning numbers.
Unpadded inputs give identical outputs either way.

Numerics note: the official Flax blocks use tanh GELU; the PyTorch port's blocks use erf
GELU. Our model computes what the Flax code computes, whichever file the weights came from.

Export (`--to bigs-official`) writes the Flax layout back: `flax_model.msgpack` (the same
table, float32, as HF `save_pretrained` writes it) and a BiGSConfig `config.json`, for a
gated+ssm encoder with a shared SSM and an MLM or classification head. The padding mode is
not part of the format: pass `--official-padding` again when importing the export.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
from flax import serialization

from bigs_jax.convert.common import (
    ConversionError,
    Imported,
    KeyMap,
    Rule,
    abstract_params,
    check_tied,
    linear,
    nest,
    norm,
    read_hf_weights,
    read_json,
    read_msgpack,
)
from bigs_jax.convert.hf_bert import bert_config_fields
from bigs_jax.models.encoder import EncoderConfig

FORMAT = "bigs-official"
MSGPACK = "flax_model.msgpack"
SSM_PARAMS = ("A_re", "A_im", "C", "D", "log_step")
DENSES = ("dv", "du_forward", "du_backward", "duc_forward", "duc_backward", "dol", "do")
# BiGSConfig.scaling (SSM init; the released checkpoints predate the key: "hippo") ↔ ssm_init.
SCALING = {"hippo": "legs", "lin": "lin", "inv": "inv"}
ARCHITECTURES = {"mlm": "FlaxBiGSForMaskedLM",
                 "classification": "FlaxBiGSForSequenceClassification"}
# FlaxBiGSPooler: "mean" averages every position, anything else the non-padding ones.
POOLER_TYPES = ("mean", "non_padding_mean")


def _flax_dense(foreign: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{foreign}/kernel", f"{ours}/kernel"), Rule(f"{foreign}/bias", f"{ours}/bias")


def _flax_norm(foreign: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{foreign}/scale", f"{ours}/scale"), Rule(f"{foreign}/bias", f"{ours}/bias")


_FLAX_LAYER = "s4_bert/encoder/layer/{i}"
_TORCH_LAYER = "bigs.encoder.layer.{i}"
_OURS = "layers/{i}"

# The Flax tree, "/"-joined (research/bigs.md §1.6).
FLAX_KEY_MAP = KeyMap((
    Rule("s4_bert/embeddings/word_embeddings/embedding", "embeddings/word/embedding"),
    Rule("s4_bert/embeddings/position_embeddings/embedding", "embeddings/position/embedding"),
    Rule("s4_bert/embeddings/token_type_embeddings/embedding",
         "embeddings/token_type/embedding"),
    *_flax_norm("s4_bert/embeddings/LayerNorm", "embeddings/norm"),
    *_flax_norm(f"{_FLAX_LAYER}/LayerNorm", f"{_OURS}/norm"),
    *(Rule(f"{_FLAX_LAYER}/{d}/{p}", f"{_OURS}/{d}/{p}")
      for d in ("fs4", "bs4") for p in SSM_PARAMS),
    *(r for d in DENSES for r in _flax_dense(f"{_FLAX_LAYER}/{d}", f"{_OURS}/{d}")),
    *_flax_dense("cls/predictions/transform/dense", "mlm_head/transform"),
    *_flax_norm("cls/predictions/transform/LayerNorm", "mlm_head/norm"),
    Rule("cls/predictions/bias", "mlm_head/bias"),
    *_flax_dense("s4_bert/pooler/dense", "classifier/pooler"),
    *_flax_dense("classifier", "classifier/classifier"),
))

# The PyTorch port's state dict (modeling_bigs.py): `bigs.` prefix, torch Linear/LayerNorm.
TORCH_KEY_MAP = KeyMap((
    Rule("bigs.embeddings.word_embeddings.weight", "embeddings/word/embedding"),
    Rule("bigs.embeddings.position_embeddings.weight", "embeddings/position/embedding"),
    Rule("bigs.embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding"),
    *norm("bigs.embeddings.LayerNorm", "embeddings/norm"),
    *norm(f"{_TORCH_LAYER}.LayerNorm", f"{_OURS}/norm"),
    *(Rule(f"{_TORCH_LAYER}.{d}.kernel.{p}", f"{_OURS}/{d}/{p}")
      for d in ("fs4", "bs4") for p in ("A_re", "A_im", "C", "log_step")),
    *(Rule(f"{_TORCH_LAYER}.{d}.D", f"{_OURS}/{d}/D") for d in ("fs4", "bs4")),
    *(r for d in DENSES for r in linear(f"{_TORCH_LAYER}.{d}", f"{_OURS}/{d}")),
    *linear("cls.predictions.transform.dense", "mlm_head/transform"),
    *norm("cls.predictions.transform.LayerNorm", "mlm_head/norm"),
    Rule("cls.predictions.bias", "mlm_head/bias"),
    *linear("bigs.pooler.dense", "classifier/pooler"),
    *linear("classifier", "classifier/classifier"),
), ignore=(
    r"bigs\.embeddings\.(position_ids|token_type_ids)",  # buffers
    r"cls\.predictions\.decoder\.(weight|bias)",          # tied copies (checked equal first)
))


def official_to_ours(name: str) -> Optional[str]:
    """Our parameter path for an official Flax checkpoint path, or None if unknown."""
    found = FLAX_KEY_MAP.ours_of(name)
    return None if found is None else found[0].our_paths[0].format(**found[1])


def ours_to_official(path: str) -> Optional[str]:
    """The official Flax checkpoint path of one of our parameter paths, or None if unmapped."""
    found = FLAX_KEY_MAP.foreign_of(path)
    return None if found is None else found[0].foreign.format(**found[1])


def detect(src: str) -> bool:
    """config.json says BiGS, or the msgpack's first bytes name the `s4_bert` tree."""
    config = os.path.join(src, "config.json")
    if os.path.exists(config) and str(read_json(config).get("model_type", "")).lower() == "bigs":
        return True
    path = os.path.join(src, MSGPACK)
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        # Top-level keys come first; the `cls` subtree before `s4_bert` is a few MB at most.
        return b"s4_bert" in f.read(32 << 20)


def config_from_official(hf: Mapping[str, Any], head: str, num_labels: int,
                         official_padding: bool, config_path: str) -> EncoderConfig:
    """Our gated+ssm encoder config for an official BiGSConfig dict (its defaults if absent)."""
    model_type = str(hf.get("model_type", "BiGS"))
    if model_type.lower() != "bigs":
        raise ConversionError(f"{config_path} has model_type {model_type!r}, not 'BiGS'; use "
                              "--from auto for this checkpoint")
    scaling = hf.get("scaling", "hippo")
    if scaling not in SCALING:
        raise ConversionError(f"{config_path}: scaling {scaling!r} is not one of "
                              f"{sorted(SCALING)}; fix the config.json")
    return EncoderConfig(
        block="gated", mixer="ssm", ssm_shared=True, ssm_init=SCALING[scaling],
        **bert_config_fields(hf, num_layers=24),  # BiGSConfig's default depth is 24
        num_heads=hf.get("num_attention_heads", EncoderConfig.num_heads),
        ssm_state=hf.get("num_ssm", 64),
        pre_norm=hf.get("pre_norm", True),
        mlm_head_init_std=None,
        head=head, num_labels=num_labels,
        pooler=hf.get("pooler_type", "non_padding_mean"),
        official_padding=official_padding)


def import_checkpoint(src: str, options: Mapping[str, Any]) -> Imported:
    """Read an official BiGS directory (msgpack preferred, else the PyTorch port)."""
    config_path = os.path.join(src, "config.json")
    hf = read_json(config_path)
    if os.path.exists(os.path.join(src, MSGPACK)):
        filename = MSGPACK
        tensors = read_msgpack(os.path.join(src, MSGPACK))
        key_map, cls_key, mlm_key = FLAX_KEY_MAP, "classifier/kernel", "cls/predictions/bias"
    else:
        tensors, filename = read_hf_weights(src)
        key_map, cls_key, mlm_key = TORCH_KEY_MAP, "classifier.weight", "cls.predictions.bias"
        check_tied(tensors, "cls.predictions.decoder.weight",
                   "bigs.embeddings.word_embeddings.weight", "MLM decoder")
        check_tied(tensors, "cls.predictions.decoder.bias", "cls.predictions.bias", "MLM bias")
    head = "classification" if cls_key in tensors else "mlm" if mlm_key in tensors else "none"
    num_labels = (tensors[cls_key].shape[1 if key_map is FLAX_KEY_MAP else 0]
                  if head == "classification" else 2)
    padding = bool(options.get("official_padding"))
    config = config_from_official(hf, head, int(num_labels), padding, config_path)
    notes = []
    if head != "classification":
        # The PyTorch port builds a (random, unused) pooler into every model.
        key_map = key_map.with_ignored(r"bigs\.pooler\.dense\.(weight|bias)")
    if padding:
        notes.append("official_padding=True: pads leak into the backward SSM as in the "
                     "official code")
    _, target = abstract_params(config)
    params = key_map.to_ours(tensors, target, source=os.path.join(src, filename))
    return Imported(config, params, FORMAT, notes)


# ---------------------------------------------------------------------------- export


def export_config(config: EncoderConfig) -> dict:
    """The official BiGSConfig dict of an exportable encoder; what it cannot hold fails."""
    problems = []
    if (config.block, config.mixer) != ("gated", "ssm"):
        problems.append(f"block={config.block!r}, mixer={config.mixer!r} (needs gated+ssm)")
    if not config.ssm_shared:
        problems.append("ssm_shared=False (the official SSM is one per direction and layer)")
    if config.head not in ARCHITECTURES:
        problems.append(f"head={config.head!r} (official checkpoints carry an MLM or a "
                        "classification head)")
    if config.head == "classification" and config.pooler not in POOLER_TYPES:
        problems.append(f"pooler={config.pooler!r} (the official pooler averages: "
                        f"{' or '.join(POOLER_TYPES)})")
    if config.type_vocab_size < 1:
        problems.append("type_vocab_size=0 (the official embeddings have token types)")
    if problems:
        raise ConversionError("this encoder has no official BiGS equivalent: "
                              + "; ".join(problems))
    out = {
        "architectures": [ARCHITECTURES[config.head]], "model_type": "BiGS",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout, "classifier_dropout": config.classifier_dropout,
        "max_position_embeddings": config.max_len, "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.init_std, "layer_norm_eps": config.norm_eps,
        "pad_token_id": 0, "position_embedding_type": "absolute", "use_cache": True,
        "num_ssm": config.ssm_state, "pre_norm": config.uses_pre_norm, "decode": False,
        "scaling": {v: k for k, v in SCALING.items()}[config.ssm_init],
        # Only a classification head reads it; an MLM head keeps ours when it means the same.
        "pooler_type": config.pooler if config.pooler in POOLER_TYPES else POOLER_TYPES[1],
    }
    if config.head == "classification":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return out


def official_tree(params: Mapping[str, np.ndarray]) -> dict:
    """The official Flax parameter tree (float32) of our flat params."""
    flat = FLAX_KEY_MAP.to_foreign(params)
    return nest({k: np.asarray(v, np.float32) for k, v in flat.items()})


def write_weights(config: EncoderConfig, params: Mapping[str, np.ndarray],
                  directory: str) -> None:
    """Write `flax_model.msgpack` (HF `save_pretrained`'s bytes: the serialized tree)."""
    del config
    with open(os.path.join(directory, MSGPACK), "wb") as f:
        f.write(serialization.msgpack_serialize(official_tree(params)))
