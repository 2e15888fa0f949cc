"""Push and load adapters through the Hub at $HF_ENDPOINT (tests/hub_server.py); run by tests/test_hub.py.

HF_ENDPOINT is read when huggingface_hub is imported, so this runs in its own process. It uses
the real huggingface_hub client, transformers and PEFT, and prints one JSON line of results.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import torch

assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1:"), "this script only talks to a local test hub"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers
from ecosystem_utils import token_rows  # noqa: E402
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tiny_models import make_gpt2  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_spectral  # noqa: E402  (registers the method; routes PeftModel.push_to_hub for spectral models)
import hf_spectral.cli  # noqa: E402

BASE = "test-org/tiny-gpt2"
results = {}
inputs = token_rows(2, seed=3)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs).logits


# 1. the base model, pushed and loaded the transformers way
make_gpt2(seed=0).push_to_hub(BASE)
base = AutoModelForCausalLM.from_pretrained(BASE)
results["base_name_or_path"] = base.name_or_path

# 2. spectral adapters in both modes: model.push_to_hub, then PeftModel.from_pretrained from the repo
for mode, kwargs in {
    "delta": dict(target_modules=["c_attn", "c_fc"], n_coefficients=40, layout="random"),
    "replace": dict(coefficient_fraction=0.5, layout="lowfreq"),
}.items():
    repo = f"test-org/tiny-spectral-{mode}"
    config = hf_spectral.SpectralConfig(mode=mode, init_weights=False if mode == "delta" else True,
                                        task_type="CAUSAL_LM", **kwargs)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), config)
    if mode == "replace":  # a trained replace-mode model: move every parameter off its init
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
    expected = logits(model)
    commit = model.push_to_hub(repo)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), repo)
    auto = AutoPeftModelForCausalLM.from_pretrained(repo)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = hf_spectral.cli.main(["inspect", repo])
    results[mode] = {
        "commit_oid": commit.oid,
        "max_abs_diff": float((logits(loaded) - expected).abs().max()),
        "auto_max_abs_diff": float((logits(auto) - expected).abs().max()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "inspect_exit": code,
        "inspect": stdout.getvalue(),
    }

# 3. a LoRA model keeps transformers' own push (the spectral route is for spectral models only)
lora = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(target_modules=["c_attn"], r=2))
lora.push_to_hub("test-org/tiny-lora")

print(json.dumps(results))
sys.stdout.flush()
