"""M2-ViT: the Monarch Mixer image classifier.

Fu et al., "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", NeurIPS 2023,
https://arxiv.org/abs/2310.12109 (ImageNet: "M2 outperforms ViT-b by 1% in accuracy, with only
half the parameters"). No code was released; research/m2.md §2.7 says the model is the Hyena
ViT-b of HazyResearch/safari (`configs/experiment/imagenet/hyena-vit.yaml`) with its MLPs
replaced by block-diagonal matrices "similarly to M2-BERT". We build exactly that:

    patches (ViT's patch embedding, no [CLS], no position embeddings: use_pos_embed=false)
    x = x + Mixer(LN(x))        the M2/Hyena order-2 mixer (`models.m2.M2SequenceMixer`):
                                in-projection D→3D, short depthwise conv (5 taps), gating,
                                implicit-filter long conv over the patch sequence, gating,
                                out-projection
    x = x + MLP(LN(x))          Bd(D→4D) → GELU → Bd(4D→D), block-diagonal with 4 blocks
    logits = head(mean_N(LN(x)))

The Hyena ViT convolves causally along the row-major patch order (safari's HyenaOperator has
no backward kernel); `bidirectional=True` adds M2-BERT's backward kernel instead, and
`residual_long_conv=True` M2-BERT's second long convolution of the mixer input (whether M2-ViT
used it is HazyResearch/m2 issue #21, unanswered). Filter settings follow the yaml: order 128,
positional features 33, sine frequency 1. Deviations: the implicit filter MLP has two hidden
sine layers (M2-BERT's), where the Hyena ViT yaml has one (`num_inner_mlps: 1`); no stochastic
depth (the yaml's drop_path_rate 0.1).

vit-b16-sized (`m2-vit-b16`): 45.8M parameters against ViT-B/16's 86.6M, the paper's "half".

Dimension key: B batch, H image height, W image width, C channels, N patches, D model,
F mlp, Y labels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bigs_jax.layers.blocks import check_remat
from bigs_jax.layers.linear import activation, layer_norm, sharded
from bigs_jax.layers.monarch import BlockdiagLinear
from bigs_jax.models.m2 import M2Config, M2SequenceMixer, check_conv_settings
from bigs_jax.models.outputs import ModelOutput, check_dtype_policy, with_output_dtype
from bigs_jax.models.vit import (
    PatchEmbed,
    check_image_geometry,
    classifier,
    classify_patches,
    image_input,
)


@dataclasses.dataclass(frozen=True)
class M2ViTConfig:
    """Hyperparameters of M2-ViT. Hyena ViT yaml names in comments."""

    image_size: int = 224                    # img_size
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768                   # d_model
    num_layers: int = 12                     # depth
    intermediate_size: int = 3072            # expand · d_model
    mlp_nblocks: int = 4                     # blocks of the block-diagonal MLP matrices
    hidden_act: str = "gelu"
    bidirectional: bool = False              # False: the Hyena ViT's causal raster-order conv
    residual_long_conv: bool = False
    filter_order: int = 128                  # filter_args.order
    filter_emb_dim: int = 33                 # filter_args.emb_dim
    filter_w: float = 1.0                    # filter_args.w
    filter_w_mod: float = 1.0
    short_conv_size: int = 5                 # short_filter_order
    conv_mode: str = "auto"                  # auto | fft | monarch | toeplitz (as M2Config)
    conv_precision: str = "fp32"             # fp32 | bf16_3x | bf16: monarch/toeplitz matmuls
    # Width growth by duplication (bigs_jax.growth_m2) records ((blocks, copies), ...) here so
    # every channel keeps its filter decay rate (as M2Config.decay_tiling); () = ungrown.
    decay_tiling: tuple = ()
    position_embeddings: bool = False        # use_pos_embed
    norm_eps: float = 1e-5                   # torch LayerNorm default (norm: layer)
    dropout: float = 0.0
    init_std: float = 0.02
    num_labels: int = 1000                   # num_classes
    head_zero_init: bool = True
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
        check_conv_settings(self.conv_mode, self.conv_precision)
        check_remat(self.remat)
        if self.hidden_size % self.mlp_nblocks or self.intermediate_size % self.mlp_nblocks:
            raise ValueError(f"hidden_size {self.hidden_size} and intermediate_size "
                             f"{self.intermediate_size} must be multiples of mlp_nblocks "
                             f"{self.mlp_nblocks}")
        # model.json stores the tiling as lists: M2Config checks it and gives it back as a
        # hashable tuple of int pairs
        object.__setattr__(self, "decay_tiling", self.mixer_config().decay_tiling)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def mixer_config(self) -> M2Config:
        """The M2 config whose sequence mixer is this model's (over N = num_patches)."""
        return M2Config(causal=not self.bidirectional, max_len=self.num_patches,
                        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                        mlp_nblocks=self.mlp_nblocks, filter_order=self.filter_order,
                        filter_emb_dim=self.filter_emb_dim, filter_w=self.filter_w,
                        filter_w_mod=self.filter_w_mod, short_conv_size=self.short_conv_size,
                        residual_long_conv=self.residual_long_conv, norm_eps=self.norm_eps,
                        dropout=self.dropout, init_std=self.init_std, head="none",
                        conv_mode=self.conv_mode, conv_precision=self.conv_precision,
                        decay_tiling=self.decay_tiling,
                        dtype=self.dtype)


class BlockdiagMLP(nnx.Module):
    """ViT's MLP with block-diagonal matrices: Bd(D→F) → act → Bd(F→D) → dropout."""

    def __init__(self, c: M2ViTConfig, *, rngs: nnx.Rngs):
        d, f, dt = c.hidden_size, c.intermediate_size, jnp.dtype(c.dtype)
        kw = dict(nblocks=c.mlp_nblocks, use_bias=True, dtype=dt, rngs=rngs)
        self.up = BlockdiagLinear(d, f, axes=("embed", "mlp"), **kw)
        self.down = BlockdiagLinear(f, d, axes=("mlp", "embed"), **kw)
        self.act = activation(c.hidden_act)
        self.dropout = nnx.Dropout(c.dropout)

    def __call__(self, x_BND, *, deterministic=True, rngs=None):
        h_BNF = self.act(self.up(x_BND))
        return self.dropout(self.down(h_BNF), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN M2 layer: x + Mixer(LN(x)), then x + BlockdiagMLP(LN(x))."""

    def __init__(self, c: M2ViTConfig, *, rngs: nnx.Rngs):
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        self.mixer_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.mixer = M2SequenceMixer(c.mixer_config(), rngs=rngs)
        self.mlp_norm = layer_norm(d, eps=c.norm_eps, rngs=rngs, dtype=dt)
        self.mlp = BlockdiagMLP(c, rngs=rngs)
        self.dropout = nnx.Dropout(c.dropout)

    def __call__(self, x_BND, *, deterministic=True, rngs=None):
        kw = dict(deterministic=deterministic, rngs=rngs)
        # Every row is all real patches: no padding mask.
        x_BND = x_BND + self.dropout(self.mixer(self.mixer_norm(x_BND), None), **kw)
        return x_BND + self.mlp(self.mlp_norm(x_BND), **kw)


class M2ViT(nnx.Module):
    """Patch embedding → `num_layers` pre-LN M2 layers → LN → mean over patches → head."""

    def __init__(self, config: M2ViTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        d, dt = c.hidden_size, jnp.dtype(c.dtype)
        self.patch_embed = PatchEmbed(c.patch_size, c.num_channels, d, init_std=c.init_std,
                                      dtype=dt, rngs=rngs)
        self.position = nnx.data(nnx.Param(
            jax.random.normal(rngs.params(), (c.num_patches, d)) * c.init_std,
            **sharded((None, "embed"))) if c.position_embeddings else None)
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
          ModelOutput with hidden_states (B, N, D) after the final LayerNorm, pooled (B, D)
          (their mean over patches) and fp32 logits (B, Y).
        """
        c = self.config
        x_BND = self.patch_embed(image_input(images, c))
        if self.position is not None:
            x_BND = x_BND + self.position[...].astype(x_BND.dtype)[None]
        return classify_patches(self, x_BND, cls_token=False, deterministic=deterministic,
                                rngs=rngs)


# ---------------------------------------------------------------------------- registry

FAMILY = "m2_vit"
# The implicit long-convolution filters stay float32 (as in models.m2).
FP32_PARAMS = (r"(^|/)filter_fn2?/",)
Config = M2ViTConfig
Model = M2ViT

_P16 = dict(image_size=224, patch_size=16)
SIZES: dict[str, dict] = {
    # The paper's M2-ViT-b: the Hyena ViT-b widths with block-diagonal MLPs.
    "m2-vit-b16": dict(_P16, hidden_size=768, num_layers=12, intermediate_size=3072),
    "m2-vit-s16": dict(_P16, hidden_size=384, num_layers=12, intermediate_size=1536),
    # CPU size for 8x8 images (sklearn digits: the smoke config and tests).
    "m2-vit-tiny": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                        num_layers=2, intermediate_size=256, filter_order=16, num_labels=10),
}
