"""The model families of the zoo, registered by name, and `build`.

Each family module (encoder, gpt2, bigs_lm, m2, vit, m2_vit) holds its frozen config, its
model and its size table (`SIZES`); sizes follow the papers and the official configs.
Importing this package registers the six families in `registry` (`FAMILIES`, `MODELS[name]`, a `ModelSpec`), whose
public names it re-exports. The wrapper family `bigs_jax.fpt` is registered by the `bigs_jax`
package itself (it builds on the families here), which runs before any of its submodules.
`build(config)` makes the randomly initialized model of a frozen family config.
"""

from __future__ import annotations

from bigs_jax.models import bigs_lm, encoder, gpt2, m2, m2_vit, vit
from bigs_jax.models.registry import (FAMILIES, MODELS, Family, ModelSpec, build, family_of,
                                      get_spec, make_config, register)

__all__ = ["FAMILIES", "MODELS", "Family", "ModelSpec", "build", "family_of", "get_spec",
           "make_config", "register"]

# Registration order is the order of FAMILIES and MODELS (listings, error messages).
for _module in (encoder, gpt2, bigs_lm, m2, vit, m2_vit):
    register(_module)
