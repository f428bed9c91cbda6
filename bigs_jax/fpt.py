"""FPT: a frozen pretrained backbone as a universal computation engine.

Lu, Grover, Abbeel, Mordatch, "Pretrained Transformers as Universal Computation Engines",
arXiv 2103.05247 (research/fpt_growth.md §1). Any backbone of the zoo (GPT-2 as in the paper,
BERT, BiGS, M2-BERT, ViT, M2-ViT) runs on embeddings made by a new input layer, bypassing its
token embedding; a new linear output layer reads its last `ratio` positions:

    x_BLI ──Linear(I→D), orthogonal(gain 1.41), zero bias, Dropout(0.1)──┐
    ids_BL ──Embed(I, D), normal(1) (token tasks)──────────────────────────┤
                                                                           ▼
    backbone (positions, layers, final norm) ── h_BLD[:, -R:] ── Linear(D→O) ── logits

`O = predictions · num_classes / ratio`: each of the last R positions predicts O/C of the T
outputs (Bit Memory: 20 positions × 50 bits; classification: 1 position, 1 output). The
logits are (B, C) for one prediction and (B, T, C) otherwise. ViT-style backbones
(vit, m2_vit) lose their patch embedding, [CLS] and position table, as in the official code:
the wrapper adds its own learned `positions` (zeros) and runs their blocks and final norm.

Which parameters train is an optimizer freeze mask over parameter paths (`freeze_patterns`),
the official code's rule: the backbone's layer norms and positions train, its sequence mixers
(attention / SSM / long convolution), feed-forward layers and token embeddings stay frozen.
GPT-2 and BERT backbones are built with max_len = the number of tokens, so the position table
holds exactly the rows the task uses (a pretrained table's first rows are loaded): the
trainable count is the official code path's (only used rows get gradient there).

This module is the registry family "fpt" (one entry, "fpt"): it builds its backbones through
`bigs_jax.models`, so the `bigs_jax` package registers it after the model families.

Dimension key: B batch, L tokens, I input features (or vocabulary), D model, R positions read,
O outputs per read position, T predictions, C classes per prediction.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.blocks import run_layers
from bigs_jax.models.outputs import ModelOutput
from bigs_jax.models.registry import FAMILIES, build, family_of, make_config
from bigs_jax.train import checkpointing

INPUT_KINDS = ("continuous", "tokens")
# Backbones whose own input stem (patches, [CLS], fixed position table) FPT bypasses.
VISION_FAMILIES = ("vit", "m2_vit")
# Families whose learned position table is cut to the task's length (module docstring). M2's
# long-convolution filters are laid out on max_len, so M2 keeps its table (only used rows
# get gradient, as for GPT-2 in the official code).
CUT_POSITIONS = ("gpt2", "encoder")


@dataclasses.dataclass(frozen=True)
class FPTConfig:
    """The wrapper around a backbone config (`backbone`, a dict when read from model.json)."""

    backbone_family: str = "gpt2"
    backbone: object = None          # the backbone family's config
    input_kind: str = "continuous"   # continuous (Linear in) | tokens (Embed in)
    input_dim: int = 1               # features per token, or the vocabulary size
    num_tokens: int = 10             # L, the tokens the backbone sees
    num_classes: int = 2             # C
    predictions: int = 1             # T
    ratio: int = 1                   # R, last positions read
    dropout: float = 0.1             # after the continuous input layer
    orth_gain: float = 1.41          # the official `orth_gain` of the input layer

    def __post_init__(self):
        if self.backbone_family not in FAMILIES or self.backbone_family == FAMILY:
            raise ValueError(f"unknown backbone family {self.backbone_family!r}; choose one of "
                             f"{sorted(set(FAMILIES) - {FAMILY})}")
        cls = FAMILIES[self.backbone_family].config_cls
        backbone = self.backbone
        if backbone is None:
            backbone = cls()
        elif isinstance(backbone, dict):
            backbone = cls(**backbone)
        if not isinstance(backbone, cls):
            raise ValueError(f"backbone config {type(backbone).__name__} is not a "
                             f"{self.backbone_family} config")
        object.__setattr__(self, "backbone", backbone)
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"unknown input_kind {self.input_kind!r}; choose one of "
                             f"{INPUT_KINDS}")
        out = self.predictions * self.num_classes
        if out % self.ratio:
            raise ValueError(f"predictions·num_classes = {out} is not divisible by ratio "
                             f"{self.ratio}; each read position must predict whole outputs")
        if self.ratio > self.num_tokens:
            raise ValueError(f"ratio {self.ratio} exceeds num_tokens {self.num_tokens}")
        limit = getattr(backbone, "max_len", None)
        if limit is not None and self.num_tokens > limit:
            raise ValueError(f"the task has {self.num_tokens} tokens but the backbone's max_len "
                             f"is {limit}; use larger patches or a backbone with more positions")

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def param_dtype(self) -> str:
        """The backbone's storage dtype (bigs_jax.build casts with it)."""
        return self.backbone.param_dtype

    @property
    def outputs_per_position(self) -> int:
        return self.predictions * self.num_classes // self.ratio


class FPT(nnx.Module):
    """Input layer → backbone on embeddings → output layer on the last `ratio` positions."""

    def __init__(self, config: FPTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        d = c.hidden_size
        self.backbone = FAMILIES[c.backbone_family].model_cls(c.backbone, rngs=rngs)
        if c.input_kind == "tokens":
            self.input = nnx.Embed(c.input_dim, d, rngs=rngs,
                                   embedding_init=jax.nn.initializers.normal(1.0))
        else:
            self.input = nnx.Linear(c.input_dim, d, rngs=rngs,
                                    kernel_init=jax.nn.initializers.orthogonal(c.orth_gain),
                                    bias_init=jax.nn.initializers.zeros)
        self.dropout = nnx.Dropout(c.dropout)
        self.positions = nnx.data(nnx.Param(jnp.zeros((c.num_tokens, d)))
                                  if c.backbone_family in VISION_FAMILIES else None)
        self.output = nnx.Linear(d, c.outputs_per_position, rngs=rngs)

    def __call__(self, inputs: jax.Array, attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
                 rngs: Optional[nnx.Rngs] = None) -> ModelOutput:
        """Logits of a batch of token features (B, L, I) or token ids (B, L).

        `attention_mask` (B, L) masks pads for backbones that take one; the official code
        passes none and reads the last position whatever it holds. `token_type_ids` is
        accepted for the loop's calling convention and ignored.
        """
        del token_type_ids
        c = self.config
        kw = dict(deterministic=deterministic, rngs=rngs)
        if c.input_kind == "tokens":
            x_BLD = self.input(jnp.asarray(inputs))
        else:
            x_BLD = self.dropout(self.input(jnp.asarray(inputs, jnp.float32)), **kw)
        if x_BLD.shape[1] != c.num_tokens:
            raise ValueError(f"expected {c.num_tokens} tokens per example, got "
                             f"{x_BLD.shape[1]}; the data and the model config disagree")
        h_BLD = self._backbone(x_BLD, attention_mask, kw)
        h_BRD = h_BLD[:, -c.ratio:].astype(jnp.float32)
        logits_BRO = self.output(h_BRD)
        B = logits_BRO.shape[0]
        if c.predictions == 1:
            return ModelOutput(hidden_states=h_BLD, logits=logits_BRO.reshape(B, c.num_classes))
        return ModelOutput(hidden_states=h_BLD,
                           logits=logits_BRO.reshape(B, c.predictions, c.num_classes))

    def _backbone(self, x_BLD, mask_BL, kw) -> jax.Array:
        """The backbone's final hidden states (B, L, D) on input embeddings `x_BLD`."""
        c, b = self.config, self.backbone
        x_BLD = x_BLD.astype(jnp.dtype(c.backbone.dtype))
        if c.backbone_family in VISION_FAMILIES:
            x_BLD = x_BLD + self.positions[...].astype(x_BLD.dtype)[None]
            x_BLD = run_layers(b.layers, x_BLD, rngs=kw["rngs"], remat=c.backbone.remat,
                               deterministic=kw["deterministic"], scan=c.backbone.scan_layers)
            return b.final_norm(x_BLD)
        return b(inputs_embeds=x_BLD, attention_mask=mask_BL, **kw).hidden_states


# ---------------------------------------------------------------------------- freezing

# Parameter classes of every backbone family (paths under `backbone/`), in the official
# code's terms: "ln" (norms), "pos" (positions), "ff" (feed-forward), "attn" (sequence mixer).
_NORM = r"(?:.*/)?\w*norm(?:/|$)"
# The position tables the backbone reads (GPT-2, BERT, M2); ViT's own table is bypassed
# (the wrapper's `positions` replaces it), so it stays frozen like timm's pos_embed in FPT.
_POS = r"embeddings/position(?:/|$)"
_FF = r"layers/\d+/(?:mlp|dv|dol|do)/"
_ATTN = r"layers/\d+/(?:mixer|attention|du_forward|du_backward|fs4|bs4|duc_forward|duc_backward)/"


def freeze_patterns(*, freeze_ln: bool = False, freeze_pos: bool = False,
                    freeze_ff: bool = True, freeze_attn: bool = True) -> list[str]:
    """Optimizer freeze regexes (config.optim.freeze) of the official code's switches.

    Every backbone parameter is frozen except the classes switched on; anything else in the
    backbone (token embeddings, bypassed stems and heads) is always frozen. The wrapper's
    input and output layers always train; its own `positions` (ViT backbones) follow
    `freeze_pos`.
    """
    keep = [p for p, frozen in ((_NORM, freeze_ln), (_POS, freeze_pos), (_FF, freeze_ff),
                                (_ATTN, freeze_attn)) if not frozen]
    patterns = [rf"^backbone/(?!{'|'.join(keep)})" if keep else r"^backbone/"]
    if freeze_pos:
        patterns.append(r"^positions$")
    return patterns


# ---------------------------------------------------------------------------- runs


def model_config_from_run(config, data_overrides: dict) -> FPTConfig:
    """The FPT config of a train-loop run (the loop's hook for this family).

    The backbone architecture is `config.init`'s model.json when set, else the registry
    entry `config.fpt.backbone`; the data fixes the task fields (`data_overrides`).
    """
    f = config.fpt
    if config.get("init"):
        backbone = checkpointing.read_model_config(checkpointing.resolve(config.init)[0])
    else:
        if pretrained(config):
            raise ValueError("config.fpt.pretrained=True needs config.init=WORKDIR (a converted "
                             "checkpoint or a trained workdir); pass it, or set "
                             "config.fpt.pretrained=False for a random backbone")
        backbone = make_config(f.backbone)
    family = family_of(backbone).name
    if family == FAMILY:
        raise ValueError(f"config.init {config.init} holds an FPT model, not a backbone; "
                         "pass the backbone's workdir")
    changes = {}
    fields = {x.name for x in dataclasses.fields(backbone)}
    if "head" in fields and family in ("encoder", "m2"):
        changes["head"] = "none"
    tokens = data_overrides["num_tokens"]
    if family in CUT_POSITIONS:
        if tokens > backbone.max_len:
            raise ValueError(f"the task has {tokens} tokens but backbone {family} has "
                             f"max_len {backbone.max_len}; use larger patches or shorter data")
        changes["max_len"] = tokens
    if f.get("scan_layers") is not None:
        changes["scan_layers"] = f.scan_layers
    if f.get("backbone_dropout") is not None:
        for key in ("dropout", "attention_dropout"):
            if key in fields:
                changes[key] = f.backbone_dropout
    return FPTConfig(backbone_family=family, backbone=dataclasses.replace(backbone, **changes),
                     dropout=f.dropout, orth_gain=f.orth_gain, **data_overrides)


def pretrained(config) -> bool:
    """config.fpt.pretrained, which defaults to whether config.init is set."""
    value = config.fpt.get("pretrained")
    return bool(config.get("init")) if value is None else bool(value)


def restore_init(config, params) -> tuple[Any, str]:
    """`params` with the backbone of `config.init` under `backbone/` (the loop's hook).

    A position table longer than this model's (the checkpoint's max_len) gives its first
    rows. With config.fpt.pretrained=False nothing is loaded: the control keeps the same
    architecture at random init.
    """
    if not pretrained(config):
        return params, f"backbone at random init (config.fpt.pretrained=False, seed " \
                       f"{config.train.seed}); architecture from {config.init}"
    workdir, step = checkpointing.resolve(config.init)
    source_config = checkpointing.read_model_config(workdir)
    flat = _flat(params)
    mesh = next(iter(flat.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            nnx.to_pure_dict(checkpointing.abstract_model(source_config)[1]))
    source = _flat(checkpointing.restore_params(workdir, step, abstract))
    loaded, problems = {}, []
    for key, like in flat.items():
        if not key.startswith("backbone/"):
            continue
        src = source.get(key[len("backbone/"):])
        if src is None:
            problems.append(f"{key} missing")
        elif src.shape == like.shape:
            loaded[key] = src
        elif src.shape[1:] == like.shape[1:] and src.shape[0] > like.shape[0] and \
                key.endswith("position/embedding"):
            loaded[key] = src[:like.shape[0]]
        else:
            problems.append(f"{key} {tuple(src.shape)} vs {tuple(like.shape)}")
    if problems:
        raise ValueError(f"config.init {config.init} does not fit the FPT backbone: "
                         f"{'; '.join(problems)}")

    def pick(path, like):
        key = _key(path)
        return jax.device_put(loaded[key].astype(like.dtype), like.sharding) \
            if key in loaded else like

    unused = sorted(k for k in source if f"backbone/{k}" not in flat)
    return jax.tree_util.tree_map_with_path(pick, params), (
        f"backbone initialized from {workdir} step {step}: {len(loaded)} arrays loaded; "
        f"unused: {', '.join(unused) or 'none'}")


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree) -> dict:
    return {_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def trainable_count(config: FPTConfig, freeze: list[str]) -> tuple[int, int]:
    """(trainable, total) parameter counts of an FPT model under `freeze`, from shapes."""
    shapes = _flat(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(config)))))
    total = sum(int(x.size) for x in shapes.values())
    frozen = sum(int(x.size) for k, x in shapes.items()
                 if any(re.search(p, k) for p in freeze))
    return total - frozen, total


# ---------------------------------------------------------------------------- registry

# What bigs_jax.models.registry.register reads; the `bigs_jax` package registers this module
# (it wraps the families of bigs_jax.models, which must exist first).
FAMILY = "fpt"
Config = FPTConfig
Model = FPT
# The backbones' float32 generators (encoder SSMs, M2 filters), under `backbone/`.
FP32_PARAMS = (r"(^|/)(fs4|bs4)/", r"(^|/)filter_fn2?/")
# The registry entry; the backbone and the task come from the run (model_config_from_run).
SIZES: dict[str, dict] = {"fpt": {}}
