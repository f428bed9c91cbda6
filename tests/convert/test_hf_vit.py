"""HF ViT ↔ bigs_jax through `python -m bigs_jax.convert`: logits parity and exact round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bigs_jax
from bigs_jax.convert.common import ConversionError, convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_dir(tmp_path, cls=None, **kw):
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, num_labels=5, **kw)
    torch.manual_seed(0)
    hf = (cls or transformers.ViTForImageClassification)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    return hf, str(path)


def test_import_matches_hf_and_export_round_trips(tmp_path):
    hf, src = _hf_dir(tmp_path)
    line = convert(src, str(tmp_path / "ours"))
    assert "hf-vit" in line and "vit" in line
    model = bigs_jax.load(str(tmp_path / "ours"))
    x = np.random.RandomState(0).randn(3, 8, 8, 3).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).logits.numpy()
    ours = np.asarray(jax.jit(lambda x: model(x).logits)(jnp.asarray(x)))
    assert np.abs(ours - ref).max() < 1e-4
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="hf")
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back").eval()
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_vit_model_without_head_imports_with_zero_head_and_pooler_is_refused(tmp_path):
    _, src = _hf_dir(tmp_path, cls=lambda c: transformers.ViTModel(c, add_pooling_layer=False))
    line = convert(src, str(tmp_path / "ours"))
    assert "head starts from zeros" in line
    model = bigs_jax.load(str(tmp_path / "ours"))
    assert float(jnp.abs(model.head.kernel[...]).max()) == 0.0
    _, src2 = _hf_dir(tmp_path / "p", cls=transformers.ViTModel)
    with pytest.raises(ConversionError, match="pooler"):
        convert(src2, str(tmp_path / "ours2"))
    assert not (tmp_path / "ours2").exists()
