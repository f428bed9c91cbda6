"""HF BERT (`BertModel`, `BertForMaskedLM`, `BertForSequenceClassification`) ↔ our encoder.

Import reads an HF directory (config.json + model.safetensors or pytorch_model.bin, with or
without the `bert.` prefix) into a stack+attention encoder with post-LayerNorm blocks; export
writes such an encoder back as a directory `transformers` loads with no missing or unexpected
keys. The head follows `architectures` in config.json (or the tensors present when it is
absent): BertForMaskedLM and BertForPreTraining → `mlm` (the NSP head is dropped),
BertForSequenceClassification → `classification` with the [CLS] pooler, BertModel → `none`
(its pooler is dropped: nothing reads it without a classifier). A head-less model exports as
`BertModel` without a pooler; load it with `BertModel.from_pretrained(dir,
add_pooling_layer=False)`. A sentence-transformers directory (modules.json) also keeps its
pooling (`sentence_transformers.py`), which `bigs_jax.embed` applies.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from bigs_jax.convert.common import (
    ConversionError,
    Imported,
    KeyMap,
    Rule,
    Tensors,
    abstract_params,
    check_tied,
    linear,
    norm,
    read_hf_weights,
    read_json,
    strip_prefix,
)
from bigs_jax.convert import sentence_transformers
from bigs_jax.layers.linear import ACTIVATIONS
from bigs_jax.models.encoder import EncoderConfig

FORMAT = "hf-bert"
PREFIX = "bert."
HEAD_PREFIXES = ("cls.", "classifier.")

_LAYER, _OURS = "encoder.layer.{i}", "layers/{i}"
KEY_MAP = KeyMap((
    Rule("embeddings.word_embeddings.weight", "embeddings/word/embedding"),
    Rule("embeddings.position_embeddings.weight", "embeddings/position/embedding"),
    Rule("embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding"),
    *norm("embeddings.LayerNorm", "embeddings/norm"),
    *linear(f"{_LAYER}.attention.self.query", f"{_OURS}/mixer/query"),
    *linear(f"{_LAYER}.attention.self.key", f"{_OURS}/mixer/key"),
    *linear(f"{_LAYER}.attention.self.value", f"{_OURS}/mixer/value"),
    *linear(f"{_LAYER}.attention.output.dense", f"{_OURS}/mixer/out"),
    *norm(f"{_LAYER}.attention.output.LayerNorm", f"{_OURS}/mixer_norm"),
    *linear(f"{_LAYER}.intermediate.dense", f"{_OURS}/mlp/up"),
    *linear(f"{_LAYER}.output.dense", f"{_OURS}/mlp/down"),
    *norm(f"{_LAYER}.output.LayerNorm", f"{_OURS}/mlp_norm"),
    *linear("cls.predictions.transform.dense", "mlm_head/transform"),
    *norm("cls.predictions.transform.LayerNorm", "mlm_head/norm"),
    Rule("cls.predictions.bias", "mlm_head/bias"),
    *linear("pooler.dense", "classifier/pooler"),
    *linear("classifier", "classifier/classifier"),
), ignore=(
    r"embeddings\.position_ids",                  # a buffer older checkpoints saved
    r"cls\.predictions\.decoder\.(weight|bias)",  # tied copies (checked equal first)
    r"cls\.seq_relationship\.(weight|bias)",      # BertForPreTraining's NSP head
))

ARCHITECTURES = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
                 "BertForSequenceClassification": "classification", "BertModel": "none"}
EXPORT_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items() if k != "BertForPreTraining"}


def detect(src: str) -> bool:
    path = os.path.join(src, "config.json")
    return os.path.exists(path) and read_json(path).get("model_type") == "bert"


def _head(hf: Mapping[str, Any], names: set[str], config_path: str) -> str:
    archs = hf.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ConversionError(f"{config_path}: architecture {archs[0]} is not supported; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    if "cls.predictions.transform.dense.weight" in names:
        return "mlm"
    return "classification" if "classifier.weight" in names else "none"


def _check_model_type(hf: Mapping[str, Any], config_path: str) -> None:
    if hf.get("model_type", "bert") != "bert":
        raise ConversionError(f"{config_path} has model_type {hf.get('model_type')!r}, not "
                              "'bert'; use --from auto (or --from hf) for this checkpoint")


def config_from_hf(hf: Mapping[str, Any], head: str, config_path: str) -> EncoderConfig:
    """Our encoder config for an HF BertConfig dict (HF defaults for absent keys)."""
    _check_model_type(hf, config_path)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{config_path}: position_embedding_type "
                              f"{hf['position_embedding_type']!r} is not supported; only "
                              "'absolute' positions convert")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConversionError(f"{config_path}: decoder / cross-attention BERT is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{config_path}: hidden_act {act!r} is not supported; choose one "
                              f"of {sorted(ACTIVATIONS)}")
    if head == "mlm" and act != "gelu":
        raise ConversionError(f"{config_path}: an MLM head with hidden_act {act!r} is not "
                              "supported (our MLM head uses erf GELU, HF's 'gelu')")
    fields = bert_config_fields(hf, num_layers=12)
    return EncoderConfig(
        block="stack", mixer="attention", pre_norm=False, **fields,
        num_heads=hf.get("num_attention_heads", 12),
        hidden_act=act,
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        mlm_head_init_std=fields["init_std"],
        head=head, num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
        pooler="cls")


def bert_config_fields(hf: Mapping[str, Any], *, num_layers: int) -> dict[str, Any]:
    """Encoder config fields from the keys every BERT-style HF config has (`BertConfig`, and
    the official `BiGSConfig` built on it), with BertConfig's defaults."""
    return dict(
        vocab_size=hf.get("vocab_size", 30522),
        max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", num_layers),
        intermediate_size=hf.get("intermediate_size", 3072),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        classifier_dropout=hf.get("classifier_dropout"),
        init_std=hf.get("initializer_range", 0.02),
    )


def import_checkpoint(src: str, options: Mapping[str, Any]) -> Imported:
    """Read an HF BERT directory into (our config, our flat params)."""
    del options
    config_path = os.path.join(src, "config.json")
    hf = read_json(config_path)
    _check_model_type(hf, config_path)
    tensors, filename = read_hf_weights(src)
    tensors = strip_prefix(tensors, PREFIX)
    head = _head(hf, set(tensors), config_path)
    config = config_from_hf(hf, head, config_path)
    check_tied(tensors, "cls.predictions.decoder.weight", "embeddings.word_embeddings.weight",
               "MLM decoder")
    check_tied(tensors, "cls.predictions.decoder.bias", "cls.predictions.bias", "MLM bias")
    key_map = KEY_MAP
    notes = []
    if head != "classification":
        key_map = key_map.with_ignored(r"pooler\.dense\.(weight|bias)")
        if "pooler.dense.weight" in tensors:
            notes.append("dropped the pooler (only a classification head reads it)")
    _, target = abstract_params(config)
    params = key_map.to_ours(tensors, target, source=os.path.join(src, filename))
    return Imported(config, params, FORMAT, notes, pooling=sentence_transformers.read_pooling(src))


def hf_config(config: EncoderConfig) -> dict:
    """The HF config.json of an exportable encoder; unsupported settings fail clearly."""
    problems = []
    if (config.block, config.mixer) != ("stack", "attention"):
        problems.append(f"block={config.block!r}, mixer={config.mixer!r} (needs stack+attention)")
    if config.uses_pre_norm:
        problems.append("pre_norm=True (BERT is post-norm)")
    head_dim = config.hidden_size // config.num_heads
    if config.hidden_size % config.num_heads or {config.qk_head_dim, config.v_head_dim} - {
            None, head_dim}:
        problems.append("head dims other than hidden_size // num_heads")
    if config.hidden_act not in ("gelu", "gelu_new", "relu"):
        problems.append(f"hidden_act={config.hidden_act!r}")
    if config.head == "mlm" and config.hidden_act != "gelu":
        problems.append("an MLM head with hidden_act other than 'gelu'")
    if config.head == "classification" and config.pooler != "cls":
        problems.append(f"pooler={config.pooler!r} (HF BERT pools the first token)")
    if config.type_vocab_size < 1:
        problems.append("type_vocab_size=0")
    if problems:
        raise ConversionError("this encoder has no HF BERT equivalent: " + "; ".join(problems))
    out = {
        "architectures": [EXPORT_ARCHITECTURE[config.head]], "model_type": "bert",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "classifier_dropout": config.classifier_dropout,
        "max_position_embeddings": config.max_len, "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.init_std, "layer_norm_eps": config.norm_eps,
        "pad_token_id": 0, "position_embedding_type": "absolute", "torch_dtype": "float32",
    }
    if config.head == "classification":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return out


def export_tensors(config: EncoderConfig, params: Mapping) -> Tensors:
    """HF state-dict tensors of our flat params, named for `hf_config(config)`'s class."""
    tensors = KEY_MAP.to_foreign(params)
    if config.head == "none":
        return tensors
    return {k if k.startswith(HEAD_PREFIXES) else PREFIX + k: v for k, v in tensors.items()}


def write_pooling(config: EncoderConfig, pooling, directory: str) -> None:
    """The sentence-transformers modules of an exported workdir that recorded a pooling."""
    sentence_transformers.write_modules(pooling, config.hidden_size, directory)
