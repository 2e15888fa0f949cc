"""Push a mixer model to the Hub at $HF_ENDPOINT (tests/hub_server.py) and load it back by repo id; run by
tests/test_mixing_auto.py. HF_ENDPOINT is read when huggingface_hub is imported, so this runs in its own process.
It prints one JSON line of results."""

from __future__ import annotations

import json
import os
import sys

import torch

assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1:"), "this script only talks to a local test hub"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers
from tiny_models import make_gpt2  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_spectral  # noqa: E402, F401  (registers the mixer model types)
from hf_spectral.mixing import SpectralMixingConfig, replace_attention  # noqa: E402

REPO = "test-org/tiny-mixer"
model = replace_attention(make_gpt2(), SpectralMixingConfig()).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
inputs = torch.arange(10)[None]
commit = model.push_to_hub(REPO)
loaded = AutoModelForCausalLM.from_pretrained(REPO, revision=commit.oid, dtype=torch.bfloat16, device_map="cpu")
exact = AutoModelForCausalLM.from_pretrained(REPO, revision="main")
with torch.no_grad():
    expected = model(input_ids=inputs).logits
    results = {
        "class": type(loaded).__name__,
        "max_abs_diff": float((exact(input_ids=inputs).logits - expected).abs().max()),
        "bf16_linear": str(loaded.transformer.h[0].attn.in_proj.weight.dtype),
        "bf16_dictionary": str(loaded.transformer.h[0].attn.omega.dtype),
    }
print(json.dumps(results))
