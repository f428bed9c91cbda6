"""Key map between the official BiGS Flax checkpoints and our parameter tree.

The official `flax_model.msgpack` files of JunxiongWang/BiGS_{128,512,1024,4096} (and the
`*_MNLI` sequence-classification ones) name parameters as research/bigs.md §1.6 lists. Our
gated+ssm encoder keeps the official layer-internal names (`dv`, `du_forward`, `fs4`, ...), so
the map only renames the containers. One table, read in both directions.
"""

from __future__ import annotations

import re

# (official path regex, our path template). `{i}` is the layer index.
FLAX_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"s4_bert/embeddings/word_embeddings/embedding", "embeddings/word/embedding"),
    (r"s4_bert/embeddings/position_embeddings/embedding", "embeddings/position/embedding"),
    (r"s4_bert/embeddings/token_type_embeddings/embedding", "embeddings/token_type/embedding"),
    (r"s4_bert/embeddings/LayerNorm/(?P<p>scale|bias)", "embeddings/norm/{p}"),
    (r"s4_bert/encoder/layer/(?P<i>\d+)/LayerNorm/(?P<p>scale|bias)", "layers/{i}/norm/{p}"),
    (r"s4_bert/encoder/layer/(?P<i>\d+)/(?P<d>fs4|bs4)/(?P<p>A_re|A_im|C|D|log_step)",
     "layers/{i}/{d}/{p}"),
    (r"s4_bert/encoder/layer/(?P<i>\d+)/(?P<d>dv|du_forward|du_backward|duc_forward"
     r"|duc_backward|dol|do)/(?P<p>kernel|bias)", "layers/{i}/{d}/{p}"),
    (r"cls/predictions/transform/dense/(?P<p>kernel|bias)", "mlm_head/transform/{p}"),
    (r"cls/predictions/transform/LayerNorm/(?P<p>scale|bias)", "mlm_head/norm/{p}"),
    (r"cls/predictions/bias", "mlm_head/bias"),
    (r"s4_bert/pooler/dense/(?P<p>kernel|bias)", "classifier/pooler/{p}"),
    (r"classifier/(?P<p>kernel|bias)", "classifier/classifier/{p}"),
)


def _template_regex(template: str) -> str:
    return "".join(f"(?P<{m[1:-1]}>[^/]+)" if m.startswith("{") else re.escape(m)
                   for m in re.split(r"(\{\w+\})", template) if m)


def _fill(pattern: str, groups: dict) -> str:
    """Fill the named groups of an (official) regex with values to get a concrete path."""
    out = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: groups[m[1]], pattern)
    return out.replace("\\", "")


def official_to_ours(name: str) -> str | None:
    """Our parameter path for an official checkpoint path, or None if unknown."""
    for pattern, template in FLAX_KEY_MAP:
        m = re.fullmatch(pattern, name)
        if m:
            return template.format(**m.groupdict())
    return None


def ours_to_official(path: str) -> str | None:
    """The official checkpoint path for one of our parameter paths, or None if unmapped."""
    for pattern, template in FLAX_KEY_MAP:
        m = re.fullmatch(_template_regex(template), path)
        if m:
            candidate = _fill(pattern, m.groupdict())
            if re.fullmatch(pattern, candidate):
                return candidate
    return None
