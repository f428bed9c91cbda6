"""M2-ViT image classification (Fu et al. 2023, Monarch Mixer) on a tfds dataset.

    python train.py --config=configs/m2_vit.py:smoke --workdir=workdirs/m2-vit-digits
    python train.py --config=configs/m2_vit.py:size=b16 --workdir=/path/to/run \
        --config.data.data_dir=/path/to/tensorflow_datasets

`smoke` trains `m2-vit-tiny` (patch 2 on 8x8, width 64, 2 layers, block-diagonal MLPs, causal
long convolutions over the 16 patches as in the Hyena ViT) on scikit-learn's bundled 8x8 digits
(`sklearn_digits`, no network): 600 steps of batch 64, then 96.9% accuracy on the 360
held-out digits, 71-82 s for the whole command on a busy 2-core CPU.

Sizes: tiny (8x8 images), s16, b16 (the paper's M2-ViT-b, 45.8M params, 224 px). The data and
optimizer settings are configs/vit.py's (see there); `--config.model.bidirectional=True` swaps
the Hyena ViT's causal patch convolution for M2-BERT's bidirectional one.
"""

from bigs_jax.train.config import parse_arg, pick_size
from configs.vit import image_config

SIZES = {"tiny": "m2-vit-tiny", "s16": "m2-vit-s16", "b16": "m2-vit-b16"}


def get_config(arg=None):
    args = parse_arg(arg, ("size", "smoke"))
    size = pick_size(args, SIZES, "b16")
    return image_config(SIZES[size], size, args)
