"""Writes the golden adapters: small spectral adapters saved by a released version, with their inputs
and expected logits, that every later version must load to the same logits (tests/test_golden.py).

    python tests/golden/make_golden.py VERSION

Run once per release that changes what is saved; it refuses to overwrite an existing version's folder,
because those files are the promise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_spectral
from hf_spectral import SpectralConfig

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("delta", "replace")
LAYOUTS = ("lowfreq", "triangle", "random", "energy", "banded")
BASES = ("dct", "random_orthonormal")
VOCAB = 32


def base_models():
    """The two layer types: Linear (a Llama) and transformers' Conv1D (a GPT-2), one block each."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))
    return {
        "linear": (llama, ["q_proj", "v_proj", "down_proj"]),
        "conv1d": (gpt2, ["c_attn", "c_proj", "c_fc"]),
    }


def main(version: str) -> None:
    root = os.path.join(HERE, version)
    if os.path.exists(root):
        raise SystemExit(f"{root} exists: golden files are never rewritten. Pick a new version.")
    os.makedirs(root)
    cases = []
    for layer_type, (model, targets) in base_models().items():
        base_dir = os.path.join(root, f"{layer_type}-base")
        model.save_pretrained(base_dir)
        input_ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        for mode in MODES:
            for layout in LAYOUTS:
                for basis in BASES:
                    name = f"{layer_type}-{mode}-{layout}-{basis}"
                    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()  # tagged as loaded: replace projects
                    budget = {"n_coefficients": 24} if mode == "delta" else {"coefficient_fraction": 0.5}
                    config = SpectralConfig(
                        mode=mode, layout=layout, basis=basis, target_modules=targets, seed=3,
                        init_weights=False if mode == "delta" else True, **budget,
                    )
                    peft_model = get_peft_model(fresh, config).eval()
                    with torch.no_grad():
                        logits = peft_model(input_ids=input_ids).logits
                    folder = os.path.join(root, name)
                    peft_model.save_pretrained(folder)
                    os.remove(os.path.join(folder, "README.md"))
                    config_path = os.path.join(folder, "adapter_config.json")
                    with open(config_path) as handle:
                        saved = json.load(handle)
                    saved["base_model_name_or_path"] = None
                    with open(config_path, "w") as handle:
                        json.dump(saved, handle, indent=2, sort_keys=True)
                    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, os.path.join(folder, "expected.safetensors"))
                    cases.append({"name": name, "base": f"{layer_type}-base", "layer_type": layer_type, "mode": mode,
                                  "layout": layout, "basis": basis})
    manifest = {"hf_spectral_version": hf_spectral.__version__, "torch": torch.__version__, "cases": cases}
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    shutil.rmtree(os.path.join(HERE, "__pycache__"), ignore_errors=True)
    print(f"wrote {len(cases)} golden adapters to {root}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
