"""ViT: the Vision Transformer image classifier.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021, https://arxiv.org/abs/2010.11929.

An image (B, H, W, C), channels last, is cut into non-overlapping P×P patches in row-major
order; each flattened patch goes through one dense layer (the stride-P convolution of the
paper, kernel laid out (P, P, C, D) as a Flax/big_vision conv), a learned [CLS] token is
prepended (`pool="cls"`) and learned absolute position embeddings are added. `num_layers`
pre-LayerNorm transformer blocks (x + Attn(LN(x)), then x + MLP(LN(x)), exact GELU), a final
LayerNorm, and a linear head on the [CLS] state or on the mean of all patch states
(`pool="gap"`, big_vision's choice for its "S/16 i1k" recipes). With `pool="cls"` the layout
is HF `ViTForImageClassification`'s, so its weights carry over one to one
(tests/models/test_vit.py copies them and compares logits).

Dimension key: B batch, H image height, W image width, C channels, P patch side,
N patches (+1 with [CLS]), D model, F mlp, Y labels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.attention import SelfAttention
from bigs_jax.layers.blocks import check_remat, run_layers
from bigs_jax.layers.linear import activation, dense, layer_norm, sharded
from bigs_jax.layers.mlp import MLP
from bigs_jax.models.outputs import ModelOutput, check_dtype_policy, with_output_dtype

POOLS = ("cls", "gap")


def check_image_geometry(config) -> None:
    """ValueError unless the patches tile the image exactly."""
    if config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size "
                         f"{config.patch_size}; resize the images (config.data.image_size) or "
                         "pick another patch size")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of ViT. HF `ViTConfig` names in comments where they differ."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12                     # num_hidden_layers
    num_heads: int = 12                      # num_attention_heads
    qk_head_dim: Optional[int] = None        # None: hidden_size // num_heads
    v_head_dim: Optional[int] = None         # None: hidden_size // num_heads
    intermediate_size: int = 3072            # the paper's "MLP size"
    hidden_act: str = "gelu"
    norm_eps: float = 1e-6                   # layer_norm_eps (HF defaults to 1e-12)
    dropout: float = 0.0                     # hidden_dropout_prob
    attention_dropout: float = 0.0           # attention_probs_dropout_prob
    init_std: float = 0.02                   # initializer_range
    pool: str = "cls"                        # cls ([CLS] token) | gap (mean of patch states)
    num_labels: int = 1000
    head_zero_init: bool = True              # the paper's zero-initialized head
    # dtype policy (outputs.DTYPES): parameter storage, compute, logits
    param_dtype: str = "float32"
    dtype: str = "float32"
    output_dtype: str = "float32"
    remat: str = "none"                      # per-layer rematerialization, see blocks.REMAT
    scan_layers: bool = False                # one jax.lax.scan over the blocks (blocks.run_layers)

    def __post_init__(self):
        check_dtype_policy(self)
        check_image_geometry(self)
        activation(self.hidden_act)
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {POOLS}")
        check_remat(self.remat)
        if (self.qk_head_dim is None or self.v_head_dim is None) and \
                self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}; pick sizes with hidden_size % num_heads == 0 "
                             "or set qk_head_dim and v_head_dim")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nnx.Module):
    """Non-overlapping P×P patches → D features: a stride-P convolution as one einsum."""

    def __init__(self, patch_size: int, channels: int, features: int, *, init_std: float,
                 dtype=None, rngs: nnx.Rngs):
        p = patch_size
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (p, p, channels, features)) * init_std,
            **sharded((None, None, None, "embed")))
        self.bias = nnx.Param(jnp.zeros((features,)), **sharded(("embed",)))
        self.patch_size, self.dtype = p, dtype

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, N, D), patches in row-major order (as a conv's flattened output)."""
        B, H, W, C = x_BHWC.shape
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"image of {H}x{W} pixels is not a whole number of {P}x{P} "
                             "patches; resize it to the model's image_size")
        dt = self.dtype or x_BHWC.dtype
        x_BhPwQC = x_BHWC.astype(dt).reshape(B, H // P, P, W // P, P, C)
        y_BhwD = jnp.einsum("BhpwqC,pqCD->BhwD", x_BhPwQC, self.kernel[...].astype(dt))
        y_BhwD = y_BhwD + self.bias[...].astype(dt)[None, None, None, :]
        return y_BhwD.reshape(B, (H // P) * (W // P), -1)


class Block(nnx.Module):
    """Pre-LN transformer encoder layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c: ViTConfig, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        self.mixer_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.mixer = SelfAttention(d, c.num_heads, qk_head_dim=c.qk_head_dim,
                                   v_head_dim=c.v_head_dim, dropout=c.attention_dropout,
                                   init_std=c.init_std, dtype=dt, rngs=rngs)
        self.mlp_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.mlp = MLP(d, c.intermediate_size, act=c.hidden_act, dropout=c.dropout,
                       init_std=c.init_std, dtype=dt, rngs=rngs)
        self.dropout = nnx.Dropout(c.dropout)

    def __call__(self, x_BND, *, deterministic=True, rngs=None):
        kw = dict(deterministic=deterministic, rngs=rngs)
        x_BND = x_BND + self.dropout(self.mixer(self.mixer_norm(x_BND), **kw), **kw)
        return x_BND + self.mlp(self.mlp_norm(x_BND), **kw)


def classifier(c, *, rngs: nnx.Rngs) -> nnx.Linear:
    """The linear head D → Y; zero-initialized when `c.head_zero_init` (ViT paper, §3.1)."""
    return dense(c.hidden_size, c.num_labels, ("embed", None), rngs=rngs,
                 init_std=0.0 if c.head_zero_init else c.init_std, dtype=jnp.dtype(c.dtype))


def image_input(images, c) -> jax.Array:
    """(B, H, W, C) float images checked against the config's geometry."""
    x_BHWC = jnp.asarray(images)
    if x_BHWC.ndim != 4 or x_BHWC.shape[1:] != (c.image_size, c.image_size, c.num_channels):
        raise ValueError(f"expected images of shape (B, {c.image_size}, {c.image_size}, "
                         f"{c.num_channels}) (channels last), got {tuple(x_BHWC.shape)}")
    return x_BHWC


class ViT(nnx.Module):
    """Patch embedding → [CLS] + positions → `num_layers` pre-LN blocks → LN → head."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        self.patch_embed = PatchEmbed(c.patch_size, c.num_channels, d, init_std=c.init_std,
                                      dtype=dt, rngs=rngs)
        self.cls = nnx.data(nnx.Param(jnp.zeros((d,)), **sharded(("embed",)))
                            if c.pool == "cls" else None)
        n = c.num_patches + (c.pool == "cls")
        self.position = nnx.Param(jax.random.normal(rngs.params(), (n, d)) * c.init_std,
                                  **sharded((None, "embed")))
        self.dropout = nnx.Dropout(c.dropout)
        self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.head = classifier(c, rngs=rngs)

    @with_output_dtype
    def __call__(self, images: jax.Array, *, deterministic: bool = True,
                 rngs: Optional[nnx.Rngs] = None) -> ModelOutput:
        """Classify a batch of images.

        Args:
          images: (B, H, W, C) float pixels, channels last, H = W = image_size.
          deterministic: disable dropout.
          rngs: dropout randomness when not deterministic.

        Returns:
          ModelOutput with hidden_states (B, N, D) after the final LayerNorm (N includes the
          [CLS] token first with pool="cls"), pooled (B, D) and fp32 logits (B, Y).
        """
        c = self.config
        x_BND = self.patch_embed(image_input(images, c))
        if self.cls is not None:
            cls_B1D = jnp.broadcast_to(self.cls[...].astype(x_BND.dtype),
                                       (x_BND.shape[0], 1, x_BND.shape[2]))
            x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
        x_BND = x_BND + self.position[...].astype(x_BND.dtype)[None]
        return classify_patches(self, x_BND, cls_token=self.cls is not None,
                                deterministic=deterministic, rngs=rngs)


def classify_patches(model: nnx.Module, x_BND: jax.Array, *, cls_token: bool,
                     deterministic: bool, rngs: Optional[nnx.Rngs]) -> ModelOutput:
    """Dropout → blocks → final LayerNorm → pool ([CLS] state or mean of patches) → head:
    the trunk of ViT and M2-ViT after their patch (and position) embeddings."""
    x_BND = model.dropout(x_BND, deterministic=deterministic, rngs=rngs)
    x_BND = run_layers(model.layers, x_BND, rngs=rngs, remat=model.config.remat,
                       deterministic=deterministic, scan=model.config.scan_layers)
    h_BND = model.final_norm(x_BND)
    pooled_BD = h_BND[:, 0] if cls_token else h_BND.mean(axis=1)
    logits_BY = model.head(pooled_BD)
    # float64 growth-exactness runs keep float64 logits; bf16/fp32 models give fp32
    logits_BY = logits_BY.astype(jnp.promote_types(logits_BY.dtype, "float32"))
    return ModelOutput(hidden_states=h_BND, logits=logits_BY, pooled=pooled_BD)


# ---------------------------------------------------------------------------- registry

FAMILY = "vit"
Config = ViTConfig
Model = ViT

# The paper's sizes (Ti and S from DeiT), patch 16 at 224 px, ImageNet's 1000 labels; the
# data source overrides num_labels / image_size / num_channels for other datasets. vit-tiny
# is a CPU size for 8x8 images (sklearn digits, the smoke config and tests).
_P16 = dict(image_size=224, patch_size=16)
SIZES: dict[str, dict] = {
    "vit-ti16": dict(_P16, hidden_size=192, num_layers=12, num_heads=3, intermediate_size=768),
    "vit-s16": dict(_P16, hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "vit-b16": dict(_P16, hidden_size=768, num_layers=12, num_heads=12,
                    intermediate_size=3072),
    "vit-l16": dict(_P16, hidden_size=1024, num_layers=24, num_heads=16,
                    intermediate_size=4096),
    "vit-tiny": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_layers=2,
                     num_heads=4, intermediate_size=128, num_labels=10),
}
