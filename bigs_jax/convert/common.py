"""Checkpoint conversion machinery shared by every foreign format.

A format module (`hf_bert`, `hf_gpt2`, `bigs_official`, ...) declares a `KeyMap`: one table of
`Rule`s, each a foreign name template, our parameter path(s) and a layout transform. The same
table runs in both directions. Templates are literal names with `{i}`-style placeholders that
stand for integers (layer indices), so reading a table is reading the two checkpoints' names.

Importing checks every leaf's shape against the abstract model and collects every missing,
unexpected and mis-shaped key before raising one `ConversionError`. A workdir is written into
a temporary directory beside its destination and renamed into place at the end, so a failed
conversion leaves nothing behind.

`convert(src, dst, ...)` is the whole job; `python -m bigs_jax.convert` only parses flags.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from flax import nnx, serialization
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from bigs_jax import embedding, fs
from bigs_jax.layers.embeddings import padded_vocab
from bigs_jax.paths import flat_paths
from bigs_jax.train import checkpointing

Tensors = dict[str, np.ndarray]

# Tokenizer files copied into `<workdir>/tokenizer/` on import and back out on export
# (sentence_bert_config.json: a sentence-transformers model's max_seq_length and casing).
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "sentence_bert_config.json")
TOKENIZER_DIR = "tokenizer"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what to fix."""


# ---------------------------------------------------------------------------- key maps


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between one foreign tensor and one or more of ours."""

    name: str
    to_ours: Callable[[np.ndarray], Union[np.ndarray, tuple]]
    to_foreign: Callable[..., np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch nn.Linear stores weight as (out, in); our kernels are (in, out).
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T)
# GPT-2's c_attn is one Conv1D (in, 3·out) holding q, k and v side by side on the last axis.
SPLIT3 = Transform("split3", lambda x: tuple(np.split(x, 3, axis=-1)),
                   lambda *xs: np.concatenate(xs, axis=-1))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`foreign` name template ↔ `ours` path template(s), through `transform`."""

    foreign: str
    ours: Union[str, tuple[str, ...]]
    transform: Transform = IDENTITY

    @property
    def our_paths(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else self.ours


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p)
                              for p in parts if p))


def linear(foreign: str, ours: str) -> tuple[Rule, Rule]:
    """A torch `nn.Linear` (weight (out, in), bias) ↔ our Dense (kernel (in, out), bias)."""
    return (Rule(f"{foreign}.weight", f"{ours}/kernel", TRANSPOSE),
            Rule(f"{foreign}.bias", f"{ours}/bias"))


def conv1d(foreign: str, ours: str) -> tuple[Rule, Rule]:
    """An HF GPT-2 `Conv1D` (weight already (in, out), bias) ↔ our Dense."""
    return (Rule(f"{foreign}.weight", f"{ours}/kernel"), Rule(f"{foreign}.bias", f"{ours}/bias"))


def norm(foreign: str, ours: str) -> tuple[Rule, Rule]:
    """A torch `nn.LayerNorm` (weight, bias) ↔ ours (scale, bias)."""
    return (Rule(f"{foreign}.weight", f"{ours}/scale"), Rule(f"{foreign}.bias", f"{ours}/bias"))


class KeyMap:
    """A declarative, two-way table between a foreign checkpoint and our parameter paths.

    Args:
      rules: the table.
      ignore: regexes of foreign names that are not parameters of ours (buffers, copies of
        tied weights, heads the chosen model does not have); dropped on import.
    """

    def __init__(self, rules: Iterable[Rule], ignore: Sequence[str] = ()):
        self.rules = tuple(rules)
        self.ignore = tuple(ignore)
        self._foreign = [(_template_regex(r.foreign), r) for r in self.rules]
        self._ours = [([_template_regex(t) for t in r.our_paths], r) for r in self.rules]

    def with_ignored(self, *patterns: str) -> "KeyMap":
        return KeyMap(self.rules, self.ignore + patterns)

    def ours_of(self, name: str) -> Optional[tuple[Rule, dict]]:
        """(rule, placeholder values) matching a foreign name, or None."""
        for regex, rule in self._foreign:
            m = regex.fullmatch(name)
            if m:
                return rule, m.groupdict()
        return None

    def foreign_of(self, path: str) -> Optional[tuple[Rule, dict]]:
        """(rule, placeholder values) with an our-path template matching `path`, or None."""
        for regexes, rule in self._ours:
            for regex in regexes:
                m = regex.fullmatch(path)
                if m:
                    return rule, m.groupdict()
        return None

    def to_ours(self, tensors: Mapping[str, np.ndarray], target: Mapping[str, tuple],
                *, source: str) -> Tensors:
        """Our flat params {path: array} from foreign tensors, checked against `target` shapes.

        Raises:
          ConversionError: listing every missing, unexpected and mis-shaped key at once.
        """
        out: Tensors = {}
        unexpected, misshaped = [], []
        for name in sorted(tensors):
            if any(re.fullmatch(p, name) for p in self.ignore):
                continue
            found = self.ours_of(name)
            if found is None:
                unexpected.append(f"{name} {tuple(tensors[name].shape)}")
                continue
            rule, groups = found
            try:
                values = rule.transform.to_ours(np.asarray(tensors[name]))
            except ValueError as e:  # e.g. a fused qkv whose width is not a multiple of 3
                misshaped.append(f"{name}: {tuple(tensors[name].shape)} ({e})")
                continue
            values = values if isinstance(values, tuple) else (values,)
            for template, value in zip(rule.our_paths, values):
                path = template.format(**groups)
                if path not in target:
                    unexpected.append(f"{name} {tuple(tensors[name].shape)} (would be {path}, "
                                      "which this model does not have)")
                elif tuple(value.shape) != tuple(target[path]):
                    misshaped.append(f"{name}: {tuple(value.shape)} as {path}, expected "
                                     f"{tuple(target[path])}")
                else:
                    out[path] = value.astype(np.float32)  # our params are fp32 (fp16/bf16 up)
        missing = []
        for path in sorted(set(target) - set(out)):
            found = self.foreign_of(path)
            if found is None:
                missing.append(f"{path} (no key-map rule)")
                continue
            name = found[0].foreign.format(**found[1])
            if name not in tensors:  # present but mis-shaped: already listed
                missing.append(f"{name} (for {path})")
        if missing or unexpected or misshaped:
            raise ConversionError(_problems(source, missing, unexpected, misshaped))
        return out

    def to_foreign(self, params: Mapping[str, np.ndarray]) -> Tensors:
        """Foreign tensors from our flat params; every path must be covered by a rule."""
        out: Tensors = {}
        used: set[str] = set()
        for regexes, rule in self._ours:
            for path in params:
                m = regexes[0].fullmatch(path)
                if m is None:
                    continue
                paths = [t.format(**m.groupdict()) for t in rule.our_paths]
                out[rule.foreign.format(**m.groupdict())] = np.ascontiguousarray(
                    rule.transform.to_foreign(*(np.asarray(params[p]) for p in paths)))
                used.update(paths)
        unmapped = sorted(set(params) - used)
        if unmapped:
            raise ConversionError(f"{len(unmapped)} parameter(s) have no place in the target "
                                  f"format: {', '.join(unmapped)}")
        return out


def _problems(source: str, missing, unexpected, misshaped) -> str:
    counts = ", ".join(f"{len(v)} {k}" for k, v in (("missing", missing),
                                                    ("unexpected", unexpected),
                                                    ("mis-shaped", misshaped)) if v)
    lines = [f"{source} does not match the model its config describes ({counts}); check that "
             "--from names the right format and that the weights belong to this config.json"]
    for kind, items in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        lines += [f"  {kind}: {item}" for item in items]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- trees


def unflatten_like(flat: Mapping[str, Any], like: Mapping) -> dict:
    """A nested dict shaped like `like` (our pure param dict) holding `flat`'s leaves."""
    def build(node, prefix):
        return {k: build(v, f"{prefix}{k}/") if isinstance(v, Mapping) else flat[f"{prefix}{k}"]
                for k, v in node.items()}

    return build(like, "")


def nest(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """A nested dict of `flat`'s `sep`-joined names; keys in natural order (layer "2" before
    "10"), as a Flax init writes them."""
    def order(key: str):
        return (0, int(key), "") if key.isdigit() else (1, 0, key)

    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    def ordered(node):
        return {k: ordered(node[k]) if isinstance(node[k], dict) else node[k]
                for k in sorted(node, key=order)}

    return ordered(tree)


# ---------------------------------------------------------------------------- reading


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise ConversionError(f"{path} not found; a checkpoint directory needs the config.json "
                              "it was saved with — copy it next to the weights")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not the object of "
                              "a model config; re-download it")
    return data


def read_safetensors(path: str) -> Tensors:
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); it may be "
                              "truncated — re-download or re-save it") from None


def read_torch(path: str) -> Tensors:
    try:
        import torch  # optional (requirements-test.txt): only pytorch_model.bin needs it
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch; pip install torch, or convert "
                              "the checkpoint to safetensors first") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or truncated files
        raise ConversionError(f"{path} is not a readable PyTorch state dict ({e}); it may be "
                              "truncated — re-download it") from None
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def read_msgpack(path: str) -> Tensors:
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types for corrupt or truncated files
        raise ConversionError(f"{path} is not a readable Flax msgpack file ({e}); it may be "
                              "truncated — re-download it") from None
    return {k: np.asarray(v) for k, v in flat_paths(tree).items()}


def read_hf_weights(src: str) -> tuple[Tensors, str]:
    """(tensors, file name) of an HF directory: safetensors first, then pytorch_model.bin.

    Sharded checkpoints (`*.index.json`) are read shard by shard.
    """
    for index, reader in (("model.safetensors.index.json", read_safetensors),
                          ("pytorch_model.bin.index.json", read_torch)):
        path = os.path.join(src, index)
        if os.path.exists(path):
            shards = sorted(set(read_json(path)["weight_map"].values()))
            tensors: Tensors = {}
            for shard in shards:
                tensors.update(reader(os.path.join(src, shard)))
            return tensors, index
    for name, reader in (("model.safetensors", read_safetensors),
                         ("pytorch_model.bin", read_torch)):
        path = os.path.join(src, name)
        if os.path.exists(path):
            return reader(path), name
    raise ConversionError(f"no model.safetensors or pytorch_model.bin in {src}; pass the "
                          "directory that save_pretrained wrote")


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> Tensors:
    """Drop a base-model prefix (`bert.`, `transformer.`) where present."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def check_tied(tensors: Mapping[str, np.ndarray], copy: str, original: str, what: str) -> None:
    """A stored copy of a tied weight must equal the original; we keep only one."""
    if copy in tensors and original in tensors:
        if tensors[copy].shape != tensors[original].shape or not np.array_equal(
                tensors[copy], tensors[original]):
            raise ConversionError(f"{copy} differs from {original}: this checkpoint has an "
                                  f"untied {what}, which this model family does not support")


# ---------------------------------------------------------------------------- formats


@dataclasses.dataclass
class Imported:
    """What an importer returns: a model config and its flat params {path: array}."""

    config: Any
    params: Tensors
    format: str
    notes: list[str] = dataclasses.field(default_factory=list)
    pooling: Optional[embedding.Pooling] = None  # a sentence-transformers model's pooling


# Importers by `--from` name: module path (exposing `detect(src) -> bool` and
# `import_checkpoint(src, options) -> Imported`).
IMPORTERS: dict[str, str] = {
    "hf-bert": "bigs_jax.convert.hf_bert",
    "hf-gpt2": "bigs_jax.convert.hf_gpt2",
    "bigs-official": "bigs_jax.convert.bigs_official",
    "m2-official": "bigs_jax.convert.m2_official",
    "hf-vit": "bigs_jax.convert.hf_vit",
}
# `--from hf`: the HF model_type in config.json picks the importer.
HF_MODEL_TYPES = {"bert": "hf-bert", "gpt2": "hf-gpt2", "vit": "hf-vit"}
# Exporters by `--to` format, then by model family (model.json "family"): module path. An
# `hf` exporter exposes `hf_config(config)` and `export_tensors(config, params)`; an official
# one `export_config(config)` and `write_weights(config, params, directory)`. Each config
# function validates first and fails naming what the format cannot hold.
EXPORTERS: dict[str, dict[str, str]] = {
    "hf": {"encoder": "bigs_jax.convert.hf_bert", "gpt2": "bigs_jax.convert.hf_gpt2",
           "vit": "bigs_jax.convert.hf_vit"},
    "bigs-official": {"encoder": "bigs_jax.convert.bigs_official"},
    "m2-official": {"m2": "bigs_jax.convert.m2_official"},
}
# What each export pair holds, for error messages.
EXPORT_PAIRS = ("hf: encoder (BERT: stack+attention), gpt2, vit; bigs-official: encoder "
                "(BiGS: gated+ssm); m2-official: m2 (M2-BERT)")
FROM_CHOICES = ("auto", "hf", *IMPORTERS)
TO_CHOICES = ("bigs", *EXPORTERS)


def _importer(name: str):
    return importlib.import_module(IMPORTERS[name])


def resolve_format(src: str, from_: str) -> str:
    """The importer name for `--from` (auto and hf resolved by looking at `src`)."""
    if from_ in IMPORTERS:
        return from_
    if from_ not in ("auto", "hf"):
        raise ConversionError(f"unknown --from {from_!r}; choose one of {FROM_CHOICES}")
    config_path = os.path.join(src, "config.json")
    model_type = None
    if os.path.exists(config_path):
        model_type = read_json(config_path).get("model_type")
    if from_ == "hf":
        if model_type not in HF_MODEL_TYPES:
            raise ConversionError(f"{config_path} has model_type {model_type!r}; --from hf reads "
                                  f"{sorted(HF_MODEL_TYPES)} (use --from auto for others)")
        return HF_MODEL_TYPES[model_type]
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    for name, module in IMPORTERS.items():
        if importlib.import_module(module).detect(src):
            return name
    raise ConversionError(f"cannot tell the format of {src} (config.json model_type "
                          f"{model_type!r}); pass --from with one of {list(IMPORTERS)}")


def abstract_params(config) -> tuple[dict, dict[str, tuple]]:
    """(pure param dict of ShapeDtypeStructs, {path: shape}) of a model, allocating nothing."""
    _, state = checkpointing.abstract_model(config)
    tree = nnx.to_pure_dict(state)
    return tree, {p: tuple(v.shape) for p, v in flat_paths(tree).items()}


def pad_vocab(config, params: Mapping[str, np.ndarray]) -> Tensors:
    """Flat params of `config.vocab_size` ids with their vocabulary axes zero-padded to the
    rows `config.vocab_multiple` asks for (pad logits are masked, so zeros never matter)."""
    out = dict(params)
    for path, axis in checkpointing.vocab_axes(config).items():
        x = np.asarray(out[path])
        width = [(0, 0)] * x.ndim
        width[axis] = (0, padded_vocab(config.vocab_size, config.vocab_multiple) - x.shape[axis])
        out[path] = np.pad(x, width)
    return out


def unpad_vocab(config, params: Mapping[str, np.ndarray]) -> Tensors:
    """Flat params with a padded vocabulary's pad rows dropped: the layout of
    `config.vocab_size` ids that foreign formats hold."""
    out = dict(params)
    if getattr(config, "vocab_multiple", 1) == 1:
        return out
    for path, axis in checkpointing.vocab_axes(config).items():
        out[path] = np.take(np.asarray(out[path]), np.arange(config.vocab_size), axis=axis)
    return out


def with_vocab_multiple(imported: Imported, multiple: int) -> Imported:
    """`imported` for a model whose vocabulary is padded to a multiple of `multiple`."""
    if multiple == 1:
        return imported
    if not hasattr(imported.config, "vocab_multiple"):
        raise ConversionError(f"--vocab-multiple applies to models with a vocabulary; this "
                              f"{imported.format} checkpoint has none, drop the flag")
    try:
        config = dataclasses.replace(imported.config, vocab_multiple=multiple)
    except ValueError as e:
        raise ConversionError(f"--vocab-multiple {multiple}: {e}") from None
    return dataclasses.replace(imported, config=config, params=pad_vocab(config,
                                                                          imported.params))


def _fresh_tmp(dst: str) -> str:
    if fs.is_uri(dst):  # os.path would make gs://b/x the local directory <cwd>/gs:/b/x
        raise ConversionError(f"{dst}: convert writes a local directory; convert to a local "
                              "path, then copy it to the bucket (gsutil -m cp -r)")
    dst = os.path.abspath(dst)
    if os.path.lexists(dst):
        raise ConversionError(f"{dst} already exists; pass a new destination (nothing is "
                              "overwritten)")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise ConversionError(f"{parent} does not exist; create the parent directory of the "
                              "destination first")
    return tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files present in `src` into `dst`; returns their names."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if names:
        os.makedirs(dst, exist_ok=True)
        for n in names:
            shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    return names


def import_to_workdir(src: str, dst: str, *, from_: str = "auto",
                      official_padding: bool = False, vocab_multiple: int = 1) -> Imported:
    """Convert a foreign checkpoint directory into a new bigs_jax workdir `dst`, its
    vocabulary padded to a multiple of `vocab_multiple` (see `pad_vocab`)."""
    if os.path.exists(os.path.join(src, checkpointing.MODEL_JSON)):
        raise ConversionError(f"{src} is already a bigs_jax workdir; export it with --to "
                              f"{{{'|'.join(EXPORTERS)}}}")
    name = resolve_format(src, from_)
    if official_padding and name not in ("bigs-official", "m2-official"):
        raise ConversionError(f"--official-padding applies to bigs-official and m2-official "
                              f"checkpoints only; {src} is {name}")
    imported = _importer(name).import_checkpoint(src, dict(official_padding=official_padding))
    pooling = imported.pooling
    if pooling is not None:
        imported.notes.append(f"sentence-transformers pooling {'+'.join(pooling.modes)}"
                              f"{' + normalize' if pooling.normalize else ''} kept in "
                              f"{embedding.POOLING_JSON}")
    imported = with_vocab_multiple(imported, vocab_multiple)
    tree, _ = abstract_params(imported.config)
    params = unflatten_like(imported.params, tree)
    tmp = _fresh_tmp(dst)
    try:
        checkpointing.write_marker(tmp)
        checkpointing.write_json_atomic(os.path.join(tmp, checkpointing.MODEL_JSON),
                                        checkpointing.model_json(imported.config))
        checkpointing.save_params_only(tmp, 0, params, {
            "converted_from": os.path.abspath(src), "format": imported.format,
            "notes": imported.notes})
        copy_tokenizer(src, os.path.join(tmp, TOKENIZER_DIR))
        if pooling is not None:
            embedding.write_pooling(tmp, pooling)
        os.rename(tmp, os.path.abspath(dst))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return imported


def export_from_workdir(src: str, dst: str, *, to: str = "hf") -> str:
    """Export a bigs_jax workdir (latest step) to a new foreign checkpoint directory `dst`.

    Returns the architecture written (e.g. "BertForMaskedLM").
    """
    if to not in EXPORTERS:
        raise ConversionError(f"unknown --to {to!r}; supported --to formats and the model "
                              f"families each holds: {EXPORT_PAIRS}")
    if not os.path.exists(os.path.join(src, checkpointing.MODEL_JSON)):
        raise ConversionError(f"{src} is not a bigs_jax workdir (no {checkpointing.MODEL_JSON});"
                              f" --to {to} exports a workdir: convert the checkpoint with "
                              "--to bigs first")
    config = checkpointing.read_model_config(src)
    family = checkpointing.model_json(config)["family"]
    if family not in EXPORTERS[to]:
        raise ConversionError(f"--to {to} cannot hold the {family!r} family; supported pairs: "
                              f"{EXPORT_PAIRS}")
    exporter = importlib.import_module(EXPORTERS[to][family])
    # Validate before anything is loaded or written.
    foreign_config = exporter.hf_config(config) if to == "hf" else exporter.export_config(config)
    model = checkpointing.load_model(src)
    params = {p: np.asarray(v) for p, v in flat_paths(nnx.to_pure_dict(nnx.state(model))).items()}
    params = unpad_vocab(config, params)  # foreign formats hold vocab_size rows
    tmp = _fresh_tmp(dst)
    try:
        if to == "hf":
            save_file(exporter.export_tensors(config, params),
                      os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            pooling = embedding.read_pooling(src)
            if pooling is not None and family == "encoder":  # a sentence-transformers model
                exporter.write_pooling(config, pooling, tmp)
        else:
            exporter.write_weights(config, params, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(foreign_config, f, indent=2, sort_keys=True)
            f.write("\n")
        copy_tokenizer(os.path.join(os.path.abspath(src), TOKENIZER_DIR), tmp)
        os.rename(tmp, os.path.abspath(dst))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return foreign_config["architectures"][0]


def convert(src: str, dst: str, *, from_: str = "auto", to: str = "bigs",
            official_padding: bool = False, vocab_multiple: int = 1) -> str:
    """Convert `src` into the new directory `dst`; returns a one-line summary.

    Args:
      src: a foreign checkpoint directory (HF `save_pretrained` output, an official BiGS
        or M2-BERT checkpoint) or, with an export `to`, a bigs_jax workdir.
      dst: the directory to create; it must not exist.
      from_: `auto`, `hf` or an importer name from `IMPORTERS`.
      to: `bigs` (a workdir `bigs_jax.load` reads), `hf` (a directory `transformers` loads),
        `bigs-official` (flax_model.msgpack + config.json) or `m2-official`
        (pytorch_model.bin + config.json); `EXPORT_PAIRS` lists the families each holds.
      official_padding: for bigs-official and m2-official imports, build the model in
        official padding mode.
      vocab_multiple: importing, pad the vocabulary to a multiple of it (e.g. 128, so it
        splits over a tensor-parallel axis); an export always drops the padding.
    """
    if not os.path.isdir(src):
        raise ConversionError(f"{src} is not a directory; pass the checkpoint directory "
                              "(the one holding config.json)")
    if to != "bigs":
        if official_padding:
            raise ConversionError("--official-padding applies to importing bigs-official and "
                                  f"m2-official checkpoints, not to --to {to}")
        if vocab_multiple != 1:
            raise ConversionError("--vocab-multiple applies to importing (--to bigs); an "
                                  "export always writes the unpadded vocabulary")
        arch = export_from_workdir(src, dst, to=to)
        return f"wrote {arch} ({to}) to {os.path.abspath(dst)}"
    imported = import_to_workdir(src, dst, from_=from_, official_padding=official_padding,
                                 vocab_multiple=vocab_multiple)
    family = checkpointing.model_json(imported.config)["family"]
    line = (f"converted {imported.format} checkpoint "
            f"({checkpointing.param_count(imported.params):,} params, "
            f"{family}) to {os.path.abspath(dst)}")
    return "; ".join([line, *imported.notes])
