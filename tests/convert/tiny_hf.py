"""Shared helpers for converter tests: tiny random HF models and their outputs."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow too
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def save_tiny(cls, config, path, seed=0):
    """A randomly initialized HF model whose every weight (LayerNorms too) is non-trivial."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def batch(vocab_size, B=3, L=17, seed=0):
    """Right-padded ids, attention mask and token types (row 1 padded after 10 tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[1, 10:] = 0
    ids = np.where(mask == 1, ids, 0)
    types = np.zeros_like(ids)
    types[:, L // 2:] = 1
    return ids, mask, types


def torch_out(model, **arrays):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in arrays.items()})
