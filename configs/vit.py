"""ViT image classification (Dosovitskiy et al. 2020) on a tfds dataset from a local data_dir.

    python train.py --config=configs/vit.py:smoke --workdir=workdirs/vit-digits
    python train.py --config=configs/vit.py:size=b16 --workdir=/path/to/run \
        --config.data.tfds_name=imagenet2012 --config.data.data_dir=/path/to/tensorflow_datasets

`smoke` trains `vit-tiny` (patch 2 on 8x8, width 64, 2 layers, 69k params) on scikit-learn's
bundled 8x8 digits (`sklearn_digits`, built into data_dir on first use, no network): 600 steps
of batch 64, then 95.0-96.4% accuracy on the 360 held-out digits (it depends on the CPU's
matmul kernels), 26-52 s for the whole command on 2-core CPUs (the acceptance bar is 90% in
5 minutes). Other datasets must be prepared first (`tfds build NAME --data_dir=DIR`);
`config.data.image_size` resizes them.

Sizes: tiny (8x8 images), ti16, s16, b16, l16 (224 px, patch 16). Large-scale settings follow
the paper's/DeiT's ImageNet recipe where it applies without augmentation: AdamW, β = (0.9,
0.999), weight decay 0.05 (matrices only), batch 1024, 5-epoch-ish warmup, cosine decay. There
is no data augmentation here (no random crop/flip, mixup or RandAugment), so ImageNet runs from
scratch will overfit sooner than the paper's.
"""

from bigs_jax.train.config import base_config, parse_arg, pick_size

SIZES = {"tiny": "vit-tiny", "ti16": "vit-ti16", "s16": "vit-s16", "b16": "vit-b16",
         "l16": "vit-l16"}


def image_config(model: str, size: str, args: dict):
    """The shared image-classification config of configs/vit.py and configs/m2_vit.py."""
    c = base_config(model=model, task="sklearn_digits", objective="classification")
    for key in ("seq_len", "mask_rate"):  # text-only keys
        del c.data[key]
    c.data.source = "images"
    c.data.tfds_name = "sklearn_digits"
    c.data.task = c.data.tfds_name  # what the checkpoint metadata records
    c.data.data_dir = ""            # "" = tfds' default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 0           # 0 = the dataset's own size; else resize to this
    c.data.mean = 0.5               # pixels/255 -> (x - mean) / std, i.e. [-1, 1]
    c.data.std = 0.5
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    if size == "tiny":
        c.data.batch_size = 64
        c.data.eval_batch_size = 120
        c.optim.lr = 2e-3
        c.optim.weight_decay = 0.01
        c.optim.warmup_steps = 50
        c.train.steps = 600
        c.train.log_every = 50
        c.train.eval_every = 200
        c.train.checkpoint_every = 300
    else:
        c.data.tfds_name = c.data.task = "imagenet2012"
        c.data.eval_split = "validation"
        c.data.image_size = 224
        c.data.batch_size = 1024
        c.data.eval_batch_size = 1000
        c.optim.lr = 1e-3
        c.optim.weight_decay = 0.05
        c.optim.warmup_steps = 6000
        c.optim.end_lr_ratio = 0.0
        c.train.steps = 375_000
        c.train.eval_every = 5000
        c.train.checkpoint_every = 5000
    return c


def get_config(arg=None):
    args = parse_arg(arg, ("size", "smoke"))
    size = pick_size(args, SIZES, "b16")
    return image_config(SIZES[size], size, args)
