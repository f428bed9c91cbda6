"""The pooling of a sentence-transformers directory (`modules.json` + `1_Pooling/config.json`).

A sentence-transformers model is an HF transformer at the directory root followed by modules
listed in `modules.json`; `bigs_jax.embed` reproduces `Pooling` (every mode) and `Normalize`.
The transformer converts as any HF checkpoint; this module reads the rest into a `Pooling`,
which the converter keeps in the workdir's `pooling.json`. Other modules (`Dense`,
`LayerNorm`, ...) would change the embedding, so they are refused rather than dropped.
Pooling configs come in two spellings: the legacy flags (`pooling_mode_mean_tokens: true`,
concatenated in sentence-transformers' fixed order) and `pooling_mode` (a name or a list).
Export (`--to hf` of a workdir with `pooling.json`) writes the same modules back, so the
directory loads in `SentenceTransformer` again.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from bigs_jax.convert.common import ConversionError, read_json
from bigs_jax.embedding import MODES, Pooling

MODULES_JSON = "modules.json"
# Legacy flags → mode, in the order sentence-transformers concatenates them.
LEGACY_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean",
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean",
                "pooling_mode_lasttoken": "lasttoken"}


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def pooling_modes(config: dict, path: str) -> tuple[str, ...]:
    """The modes of a `Pooling` config.json, in concatenation order."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(m for flag, m in LEGACY_FLAGS.items() if config.get(flag)) or ("mean",)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConversionError(f"{path}: pooling mode(s) {bad} are not supported; bigs_jax.embed "
                              f"pools by {', '.join(MODES)}")
    if config.get("include_prompt", True) is False:
        raise ConversionError(f"{path}: include_prompt=false (prompt tokens left out of the "
                              "pooling) is not supported; set it to true to convert")
    return modes


def read_pooling(src: str) -> Optional[Pooling]:
    """The pooling of the sentence-transformers directory `src`; None if it is not one."""
    path = os.path.join(src, MODULES_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:  # a JSON list (read_json reads objects)
        try:
            modules = json.load(f)
        except ValueError as e:
            raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConversionError(f"{path} is not a sentence-transformers module list; re-download "
                              "it, or delete it to convert the transformer alone")
    kinds = [_kind(m) for m in modules]
    other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if other or kinds.count("Pooling") != 1 or not kinds or kinds[0] != "Transformer":
        raise ConversionError(f"{path} lists modules {kinds}; bigs_jax.embed reproduces "
                              "Transformer → Pooling [→ Normalize] only (delete modules.json to "
                              "convert the transformer alone)")
    transformer = modules[0]
    if transformer.get("path", "") not in ("", "."):
        raise ConversionError(f"{path}: the transformer lives in {transformer['path']!r}, "
                              "not in this directory; copy its files here to convert it")
    pooling_dir = modules[kinds.index("Pooling")].get("path", "")
    config_path = os.path.join(src, pooling_dir, "config.json")
    modes = pooling_modes(read_json(config_path), config_path)
    return Pooling(modes=modes, normalize="Normalize" in kinds)


def write_modules(pooling: Pooling, hidden_size: int, directory: str) -> None:
    """Write `modules.json` and `1_Pooling/config.json` for an HF model saved in `directory`.

    The legacy flags are written when they express the modes (each once, in their fixed
    order; every sentence-transformers version reads them), else `pooling_mode`.
    """
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    legacy_order = tuple(m for m in LEGACY_FLAGS.values() if m in pooling.modes)
    if legacy_order == pooling.modes:
        config = {"word_embedding_dimension": hidden_size,
                  **{flag: mode in pooling.modes for flag, mode in LEGACY_FLAGS.items()}}
    else:
        config = {"embedding_dimension": hidden_size, "pooling_mode": list(pooling.modes)}
    os.makedirs(os.path.join(directory, "1_Pooling"))
    for path, data in ((MODULES_JSON, modules), ("1_Pooling/config.json", config)):
        with open(os.path.join(directory, path), "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
