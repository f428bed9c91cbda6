"""Official M2-BERT checkpoints (PyTorch) → our M2 model (`bigs_jax.models.m2`).

Monarch Mixer: Fu et al., arXiv 2310.12109; checkpoint layouts in research/m2.md §2.6, §3.

Two layouts hold the same state-dict names (HazyResearch/m2 `bert_layers.py`):
  - `pytorch_model.bin` (togethercomputer/m2-bert-80M-{2k,8k,32k}[-retrieval]): a raw
    state dict, `bert.*` (+ `cls.*` for MLM, `bert.pooler.*` for retrieval), possibly with a
    `module.` or `model.` prefix; fp32 and bf16 tensors mixed (upcast to fp32).
  - Composer `*.pt` (danfu09/m2-bert-*, the GCS pretrained bases): `state.model` holds the
    same names under `model.`.
The model config is read off the tensor shapes (width, depth, GLU width, filter order, max
length, legacy mixer LayerNorm, head), since the released config files are partial. The
filter's three `Sin` modules share one frequency tensor, stored under six aliased names: we
keep `implicit_filter.1.freq` and check the other five equal it. Buffers (`pos_emb.t`,
`modulation.deltas`, `position_ids`) are recomputed, not read.

Padding: the released models were trained and are used with inputs padded to max_len and no
mask; `official_padding=True` reproduces that, the default is padding-correct (identical for
unpadded inputs).

Export (`--to m2-official`) writes what the official code saves: `pytorch_model.bin`, the
`state_dict()` of its BertForMaskedLM / BertForSequenceClassification (or, for the pooler
head, the retrieval encoders' `bert.*` + `bert.pooler.*`), buffers and aliases included and
tied tensors sharing storage, and a config.json holding the official `BertConfig` fields
and the yaml-only keys `BertLayer` reads (`long_conv_l_max`, `hyena_w`, ...).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional

import numpy as np

from bigs_jax.convert.common import (
    EXPORT_PAIRS,
    IDENTITY,
    TRANSPOSE,
    ConversionError,
    Imported,
    KeyMap,
    Rule,
    Tensors,
    Transform,
    abstract_params,
    check_tied,
    copy_tokenizer,
    linear,
    norm,
    read_json,
    unflatten_like,
)
from bigs_jax.layers.longconv import filter_time, modulation_deltas
from bigs_jax.models.m2 import M2Config
from bigs_jax.train import checkpointing

FORMAT = "m2-official"
FILES = ("pytorch_model.bin", "model.bin", "model.pt")

# torch BlockdiagLinear weight (block, out, in) ↔ our kernel (block, in, out).
BLOCK_TRANSPOSE = Transform("block_transpose", lambda x: x.transpose(0, 2, 1),
                            lambda x: x.transpose(0, 2, 1))
# Depthwise Conv1d weight (C, 1, K) ↔ our ShortConv kernel (K, C).
DEPTHWISE = Transform("depthwise", lambda x: x[:, 0, :].T, lambda x: x.T[:, None, :])
# A leading singleton batch axis: pos_emb.z (1, L, E) and Sin freq (1, O).
SQUEEZE0 = Transform("squeeze0", lambda x: x[0], lambda x: x[None])

_LAYER = "bert.encoder.layer.{i}"
_OURS = "layers/{i}"
_FREQ_ALIASES = ("implicit_filter.3", "implicit_filter.5", "implicit_filter_rev.1",
                 "implicit_filter_rev.3", "implicit_filter_rev.5")


def _filter_rules(foreign: str, ours: str) -> list[Rule]:
    rules = [Rule(f"{foreign}.bias", f"{ours}/bias"),
             Rule(f"{foreign}.pos_emb.z", f"{ours}/z", SQUEEZE0),
             Rule(f"{foreign}.implicit_filter.1.freq", f"{ours}/freq", SQUEEZE0)]
    for mlp in ("implicit_filter", "implicit_filter_rev"):
        for j in range(4):  # torch Sequential indices 0, 2, 4, 6 are the Linears
            rules.append(Rule(f"{foreign}.{mlp}.{2 * j}.weight", f"{ours}/{mlp}/{j}/kernel",
                              TRANSPOSE))
            if j < 3:
                rules.append(Rule(f"{foreign}.{mlp}.{2 * j}.bias", f"{ours}/{mlp}/{j}/bias"))
    return rules


# Official name ↔ our path, one row per tensor (`{i}` is the layer index).
KEY_MAP = KeyMap((
    Rule("bert.embeddings.word_embeddings.weight", "embeddings/word/embedding"),
    Rule("bert.embeddings.position_embeddings.weight", "embeddings/position/embedding"),
    Rule("bert.embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding"),
    *norm("bert.embeddings.LayerNorm", "embeddings/norm"),
    *linear(f"{_LAYER}.attention.in_linear", f"{_OURS}/mixer/in_linear"),
    *linear(f"{_LAYER}.attention.out_linear", f"{_OURS}/mixer/out_linear"),
    Rule(f"{_LAYER}.attention.short_filter.weight", f"{_OURS}/mixer/short_filter/kernel",
         DEPTHWISE),
    Rule(f"{_LAYER}.attention.short_filter.bias", f"{_OURS}/mixer/short_filter/bias"),
    *norm(f"{_LAYER}.attention.layernorm", f"{_OURS}/mixer/norm"),
    *_filter_rules(f"{_LAYER}.attention.filter_fn", f"{_OURS}/mixer/filter_fn"),
    *_filter_rules(f"{_LAYER}.attention.filter_fn2", f"{_OURS}/mixer/filter_fn2"),
    Rule(f"{_LAYER}.mlp.gated_layers.weight", f"{_OURS}/mlp/gated_layers/kernel",
         BLOCK_TRANSPOSE),
    Rule(f"{_LAYER}.mlp.wo.weight", f"{_OURS}/mlp/wo/kernel", BLOCK_TRANSPOSE),
    Rule(f"{_LAYER}.mlp.wo.bias", f"{_OURS}/mlp/wo/bias", IDENTITY),
    *norm(f"{_LAYER}.mlp.layernorm", f"{_OURS}/mlp/norm"),
    *linear("cls.predictions.transform.dense", "mlm_head/transform"),
    *norm("cls.predictions.transform.LayerNorm", "mlm_head/norm"),
    Rule("cls.predictions.decoder.bias", "mlm_head/bias"),
    *linear("bert.pooler.dense", "pooler"),
    *linear("classifier", "classifier/classifier"),
), ignore=(
    r"bert\.embeddings\.(position_ids|token_type_ids)",            # buffers
    r"bert\.encoder\.layer\.\d+\.attention\.filter_fn2?\.(pos_emb\.t|modulation\.deltas)",
    r"bert\.encoder\.layer\.\d+\.attention\.filter_fn2?\.implicit_filter\.[35]\.freq",
    r"bert\.encoder\.layer\.\d+\.attention\.filter_fn2?\.implicit_filter_rev\.[135]\.freq",
    r"cls\.predictions\.decoder\.weight",                          # tied to word embeddings
))
# Sequence classification keeps the pooler inside our ClassificationHead.
CLASSIFIER_KEY_MAP = KeyMap(
    tuple(Rule(r.foreign, r.ours.replace("pooler", "classifier/pooler", 1), r.transform)
          if r.foreign.startswith("bert.pooler.") else r for r in KEY_MAP.rules),
    KEY_MAP.ignore)


def official_to_ours(name: str, key_map: KeyMap = KEY_MAP) -> Optional[str]:
    """Our parameter path for an official state-dict name; None for buffers/aliases/unknown."""
    found = key_map.ours_of(name)
    return None if found is None else found[0].our_paths[0].format(**found[1])


def ours_to_official(path: str, key_map: KeyMap = KEY_MAP) -> Optional[str]:
    """The official state-dict name of one of our parameter paths, or None if unmapped."""
    found = key_map.foreign_of(path)
    return None if found is None else found[0].foreign.format(**found[1])


# ---------------------------------------------------------------------------- reading


def _read_torch_file(path: str) -> Tensors:
    try:
        import torch  # optional (requirements-test.txt): only these checkpoints need it
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch; pip install torch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-tensor pickles
        raise ConversionError(
            f"{path} could not be read as a weights-only PyTorch file ({e}); if it is a "
            "Composer checkpoint with extra objects, extract `state.model` to a state dict "
            "with torch.save in a trusted environment first") from None
    if isinstance(obj, Mapping) and "state" in obj and isinstance(obj["state"], Mapping):
        obj = obj["state"].get("model", obj["state"])  # Composer: state.model
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if hasattr(v, "detach")}


def normalize_names(tensors: Mapping[str, np.ndarray]) -> Tensors:
    """Strip wrapper prefixes (`module.`, Composer's `model.`) so names start at `bert.`."""
    out: Tensors = {}
    for name, value in tensors.items():
        while True:
            stripped = re.sub(r"^(module|model)\.", "", name)
            if stripped == name:
                break
            name = stripped
        out[name] = value
    return out


def _find_weights(src: str) -> str:
    if os.path.isfile(src):
        return src
    for name in FILES:
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    pts = sorted(n for n in os.listdir(src) if n.endswith(".pt"))
    if pts:
        return os.path.join(src, pts[0])
    raise ConversionError(f"no {', '.join(FILES)} or *.pt in {src}; pass the directory "
                          "holding the official M2-BERT weights")


def detect(src: str) -> bool:
    """A directory with official M2 weights: config.json says m2_bert, or an M2 weight file."""
    path = os.path.join(src, "config.json")
    if os.path.isdir(src) and os.path.exists(path):
        if str(read_json(path).get("model_type", "")).lower() in ("m2_bert", "m2-bert"):
            return True
    return os.path.isdir(src) and any(os.path.isfile(os.path.join(src, n))
                                      for n in ("model.pt",))


# ---------------------------------------------------------------------------- config


def _shape(tensors: Mapping[str, np.ndarray], name: str, source: str) -> tuple:
    if name not in tensors:
        raise ConversionError(f"{source} has no {name}; it is not an M2-BERT state dict")
    return tuple(tensors[name].shape)


def config_from_tensors(tensors: Mapping[str, np.ndarray], *, source: str,
                        hf: Optional[Mapping[str, Any]] = None,
                        official_padding: bool = False) -> M2Config:
    """Our M2Config for an official state dict (names normalized), from its shapes."""
    hf = hf or {}
    vocab, hidden = _shape(tensors, "bert.embeddings.word_embeddings.weight", source)
    positions = "bert.embeddings.position_embeddings.weight" in tensors
    # Without learned positions (use_positional_encodings: False) the filters' positional
    # features z (1, L, E) still fix the maximum length.
    max_len = (_shape(tensors, "bert.embeddings.position_embeddings.weight", source)[0]
               if positions else _shape(
                   tensors, "bert.encoder.layer.0.attention.filter_fn.pos_emb.z", source)[1])
    type_vocab = _shape(tensors, "bert.embeddings.token_type_embeddings.weight", source)[0]
    layers = 1 + max(int(m.group(1)) for m in (re.match(r"bert\.encoder\.layer\.(\d+)\.", k)
                                               for k in tensors) if m)
    pre = "bert.encoder.layer.0"
    nblocks, _, inner_blk = _shape(tensors, f"{pre}.mlp.wo.weight", source)
    order, emb_dim = _shape(tensors, f"{pre}.attention.filter_fn.implicit_filter.0.weight",
                            source)
    short = _shape(tensors, f"{pre}.attention.short_filter.weight", source)[-1]
    if "classifier.weight" in tensors:
        head, labels = "classification", tensors["classifier.weight"].shape[0]
    elif "cls.predictions.decoder.bias" in tensors:
        head, labels = "mlm", 2
    elif "bert.pooler.dense.weight" in tensors:
        head, labels = "pooler", 2
    else:
        head, labels = "none", 2
    return M2Config(
        causal=False, vocab_size=vocab, max_len=max_len, positions=positions,
        type_vocab_size=type_vocab,
        hidden_size=hidden, num_layers=layers, intermediate_size=nblocks * inner_blk,
        mlp_nblocks=nblocks, filter_order=order, filter_emb_dim=emb_dim,
        filter_w=float(hf.get("hyena_w", M2Config.filter_w)),
        filter_w_mod=float(hf.get("hyena_w_mod", 1.0)), short_conv_size=short,
        residual_long_conv=f"{pre}.attention.filter_fn2.bias" in tensors,
        mixer_norm=f"{pre}.attention.layernorm.weight" in tensors,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        dropout=float(hf.get("hidden_dropout_prob", M2Config.dropout)),
        classifier_dropout=hf.get("classifier_dropout"),
        init_std=float(hf.get("initializer_range", M2Config.init_std)),
        pooler="non_padding_mean" if hf.get("pool_all") else "cls",
        head=head, num_labels=int(labels), official_padding=official_padding)


def _check_freq_aliases(tensors: Mapping[str, np.ndarray], source: str) -> None:
    bad = []
    for name in sorted(tensors):
        m = re.fullmatch(r"(.*\.filter_fn2?)\.implicit_filter\.1\.freq", name)
        if not m:
            continue
        for alias in _FREQ_ALIASES:
            other = f"{m.group(1)}.{alias}.freq"
            if other in tensors and not np.array_equal(tensors[other], tensors[name]):
                bad.append(other)
    if bad:
        raise ConversionError(f"{source}: these Sin frequencies differ from their filter's "
                              f"implicit_filter.1.freq, but the official model shares one "
                              f"tensor: {', '.join(bad)}")


def import_tensors(tensors: Mapping[str, np.ndarray], *, source: str = "state dict",
                   hf: Optional[Mapping[str, Any]] = None,
                   official_padding: bool = False) -> Imported:
    """Config and flat params from an official state dict (any wrapper prefix).

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key at once.
    """
    tensors = normalize_names(tensors)
    config = config_from_tensors(tensors, source=source, hf=hf,
                                 official_padding=official_padding)
    check_tied(tensors, "cls.predictions.decoder.weight",
               "bert.embeddings.word_embeddings.weight", "MLM decoder")
    _check_freq_aliases(tensors, source)
    key_map = CLASSIFIER_KEY_MAP if config.head == "classification" else KEY_MAP
    if config.head == "mlm":  # MLM checkpoints may carry an unused pooler
        key_map = key_map.with_ignored(r"bert\.pooler\.dense\.(weight|bias)")
    _, target = abstract_params(config)
    params = key_map.to_ours(tensors, target, source=source)
    notes = ["official_padding=True: pads reach real tokens as in the official code"
             ] if official_padding else []
    return Imported(config, params, FORMAT, notes)


def import_checkpoint(src: str, options: Mapping[str, Any]) -> Imported:
    """The `bigs_jax.convert` importer interface: read `src` (directory or file)."""
    path = _find_weights(src)
    config_path = os.path.join(os.path.dirname(path), "config.json")
    hf = read_json(config_path) if os.path.exists(config_path) else {}
    return import_tensors(_read_torch_file(path), source=path, hf=hf,
                          official_padding=bool(options.get("official_padding")))


def convert(src_path: str, dst_workdir: str, *, official_padding: bool = False) -> Imported:
    """Convert an official M2-BERT checkpoint into a new bigs_jax workdir.

    Nothing is written unless every tensor maps; the workdir appears atomically (renamed from
    a temporary directory beside it).

    Args:
      src_path: a directory holding `pytorch_model.bin` / `model.pt`, or the file itself.
      dst_workdir: the workdir to create; it must not exist.
      official_padding: build the model in the official (pads-not-masked) mode.
    """
    dst = os.path.abspath(dst_workdir)
    if os.path.lexists(dst):
        raise ConversionError(f"{dst} already exists; pass a new destination")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise ConversionError(f"{parent} does not exist; create it first")
    imported = import_checkpoint(src_path, {"official_padding": official_padding})
    tree, _ = abstract_params(imported.config)
    params = unflatten_like(imported.params, tree)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        checkpointing.write_json_atomic(os.path.join(tmp, checkpointing.MODEL_JSON),
                                        checkpointing.model_json(imported.config))
        checkpointing.save_params_only(tmp, 0, params, {
            "converted_from": os.path.abspath(src_path), "format": FORMAT,
            "notes": imported.notes})
        src_dir = src_path if os.path.isdir(src_path) else os.path.dirname(src_path)
        copy_tokenizer(src_dir, os.path.join(tmp, "tokenizer"))
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return imported


# ---------------------------------------------------------------------------- export

ARCHITECTURES = {"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification",
                 "pooler": "BertForTextEncoding"}
# BertPooler: the [CLS] state, or with `pool_all` the mean over unmasked positions.
POOL_ALL = {"cls": False, "non_padding_mean": True}


def export_config(config: M2Config) -> dict:
    """The official config.json of an exportable M2 model; what it cannot hold fails."""
    problems = []
    if config.causal:
        problems.append("causal=True (M2-GPT has no official code or checkpoint format; "
                        f"supported pairs: {EXPORT_PAIRS})")
    if config.head not in ARCHITECTURES:
        problems.append(f"head={config.head!r} (official models carry an MLM, a "
                        "classification or a pooler head)")
    if not config.mlp:
        problems.append("mlp=False (the released models use the block-diagonal GLU MLP)")
    if config.short_conv_size != 3:
        problems.append(f"short_conv_size={config.short_conv_size} (the official short "
                        "convolution has kernel 3)")
    if config.head in ("classification", "pooler") and config.pooler not in POOL_ALL:
        problems.append(f"pooler={config.pooler!r} (the official pooler takes [CLS] or, with "
                        "pool_all, the non-padding mean)")
    if config.decay_tiling:
        problems.append(f"decay_tiling={config.decay_tiling} (a hidden_size-grown model: "
                        "its filters keep their pre-growth decay rates, tiled, where the "
                        "official `modulation.deltas` are a linspace over all channels; export "
                        "the checkpoint from before the hidden_size growth, or keep this one in "
                        "the bigs_jax format)")
    if config.type_vocab_size < 1:
        problems.append("type_vocab_size=0 (the official embeddings have token types)")
    if problems:
        raise ConversionError("this M2 model has no official M2-BERT equivalent: "
                              + "; ".join(problems))
    out = {
        "architectures": [ARCHITECTURES[config.head]], "model_type": "m2_bert",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": 12,
        "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": config.classifier_dropout,
        "max_position_embeddings": config.max_len, "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.init_std, "layer_norm_eps": config.norm_eps,
        "pad_token_id": 0, "position_embedding_type": "absolute",
        "use_glu_mlp": True, "use_monarch_mlp": True, "monarch_mlp_nblocks": config.mlp_nblocks,
        "use_positional_encodings": config.positions,
        "monarch_mixer_sequence_mixing": True, "residual_long_conv": config.residual_long_conv,
        "bidirectional": True, "hyena_w_mod": config.filter_w_mod, "hyena_w": config.filter_w,
        "hyena_filter_order": config.filter_order, "hyena_emb_dim": config.filter_emb_dim,
        "hyena_training_additions": config.mixer_norm, "hyena_filter_dropout": 0.2,
        "long_conv_l_max": config.max_len,
        # the yaml's optimizer settings BertLayer reads (research/m2.md §2.4)
        "long_conv_kernel_learning_rate": 1e-3, "hyena_lr_pos_emb": 1e-5, "hyena_wd": 0.1,
        "use_flash_mm": False, "use_flash_fft": False,
        "pool_all": POOL_ALL.get(config.pooler, False),
    }
    if config.head == "classification":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return out


def official_state_dict(config: M2Config, params: Mapping[str, np.ndarray]) -> Tensors:
    """The official `state_dict()` (float32 numpy, int64 position ids) of our flat params.

    Aliases (the five extra Sin frequencies, the tied MLM decoder) are the same array object
    as their original, so `torch.save` stores one storage for each, as the official model does.
    """
    key_map = CLASSIFIER_KEY_MAP if config.head == "classification" else KEY_MAP
    sd = {k: np.asarray(v, np.float32) for k, v in key_map.to_foreign(params).items()}
    L, H = config.max_len, config.hidden_size
    if config.positions:
        sd["bert.embeddings.position_ids"] = np.arange(L, dtype=np.int64)[None]
    t, deltas = filter_time(L)[None], modulation_deltas(H)[None, None]
    for i in range(config.num_layers):
        for fn in ("filter_fn", "filter_fn2") if config.residual_long_conv else ("filter_fn",):
            pre = f"bert.encoder.layer.{i}.attention.{fn}"
            sd[f"{pre}.pos_emb.t"] = t.copy()  # one buffer per module, as in the official
            sd[f"{pre}.modulation.deltas"] = deltas.copy()
            for alias in _FREQ_ALIASES:
                sd[f"{pre}.{alias}.freq"] = sd[f"{pre}.implicit_filter.1.freq"]
    if config.head == "mlm":
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    return sd


def write_weights(config: M2Config, params: Mapping[str, np.ndarray], directory: str) -> None:
    """Write `pytorch_model.bin` with torch.save, as HF `save_pretrained` did in 2023."""
    try:
        import torch  # optional (requirements-test.txt): only this format needs it
    except ImportError:
        raise ConversionError("--to m2-official writes a PyTorch file and needs PyTorch; "
                              "pip install torch") from None
    sd = official_state_dict(config, params)
    # The official model builds these buffers with float32 torch.linspace, which can differ
    # from ours in the last bit; its state_dict() holds its own values, so write those.
    t = torch.linspace(0, 1, config.max_len)[None, :, None].numpy()
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3,
                            config.hidden_size)[None, None].numpy()
    sd.update({k: (t if k.endswith(".pos_emb.t") else deltas).copy()
               for k in sd if k.endswith((".pos_emb.t", ".modulation.deltas"))})
    shared: dict[int, Any] = {}  # one torch tensor per numpy array: aliases share storage
    out = {k: shared.setdefault(id(v), torch.from_numpy(np.array(v)))
           for k, v in sd.items()}
    torch.save(out, os.path.join(directory, "pytorch_model.bin"))
