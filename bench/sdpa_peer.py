"""The PyTorch side of bench/attention.py, in a process of its own that never starts JAX.

Once XLA's CPU runtime is up in a process, PyTorch's OpenMP pool there slows down (see
bench/train_step.py), so bench/attention.py runs this script as a child and talks to it one
JSON line at a time: {"kind": "layer" | "model", "L": int} runs that peer once (building it
and warming it up on first use) and answers {"seconds": float}. The parent times its own
calls between the requests, so the two never run at once.
"""

import json
import os
import sys
import time

os.environ.setdefault("USE_TF", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.bert import modeling_bert  # noqa: E402


def layer_peer(L: int):
    """HF's BertSdpaSelfAttention + its output dense (768 wide, 12 heads)."""
    config = transformers.BertConfig(attn_implementation="sdpa")
    attn = modeling_bert.BertSdpaSelfAttention(config).eval()
    dense = torch.nn.Linear(config.hidden_size, config.hidden_size).eval()
    x = torch.tensor(np.random.default_rng(L).normal(size=(1, L, config.hidden_size)),
                     dtype=torch.float32)

    def run():
        with torch.inference_mode():
            dense(attn(x)[0])

    return run


def model_peer(L: int):
    """transformers.BertModel (bert-base, sdpa), hidden states."""
    config = transformers.BertConfig(max_position_embeddings=max(L, 512),
                                     attn_implementation="sdpa")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    assert model.config._attn_implementation == "sdpa"  # pylint: disable=protected-access
    ids = torch.tensor(np.random.default_rng(L).integers(1, 30000, (1, L)), dtype=torch.long)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            model(ids, attention_mask=mask)

    return run


def main():
    peers = {}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        key = (ask["kind"], ask["L"])
        if key not in peers:
            peers[key] = (layer_peer if ask["kind"] == "layer" else model_peer)(ask["L"])
            peers[key]()  # warm-up
        t0 = time.perf_counter()
        peers[key]()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
