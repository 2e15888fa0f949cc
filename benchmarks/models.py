"""Model level: one optimizer step (forward, backward, AdamW) of whole models.

- The seed paper's character model (GPT-2 layout, 4 layers, 128 dims, 4 heads, context 128, 65
  characters; batch 32 x 128 tokens): dense against replace mode at K = mn/2 in every block linear.
- A fine-tuning step on a GPT-2-small-wide model (4 layers of 768 dims, 12 heads, vocabulary 8192,
  batch 4 x 512 tokens; built from its config, since the cost does not depend on the weights'
  values): spectral delta against LoRA and FourierFT on ``c_attn`` (PEFT's default for GPT-2) at
  matched trainable parameters.

Token ids are random: the time of a step does not depend on the text.
"""

from __future__ import annotations

import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import hf_spectral  # noqa: F401
from hf_spectral import SpectralConfig

from .common import Case, peak_memory
from .layers import matched_lora_rank


def char_model(device, dtype) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_head=4, n_embd=128, n_positions=128, vocab_size=65, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype)


def finetune_model(device, dtype) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_head=12, n_embd=768, n_positions=512, vocab_size=8192, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype)


def _train_step(model, batch, lr=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def build_model_cases(device: torch.device, dtype: torch.dtype, finetune_k: int = 65536) -> list[Case]:
    cases = []
    generator = torch.Generator().manual_seed(0)
    char_batch = torch.randint(0, 65, (32, 128), generator=generator).to(device)
    group = {"model": "char (4 x 128)", "tokens": char_batch.numel(), "dtype": str(dtype).replace("torch.", "")}
    step, params = _train_step(char_model(device, dtype), char_batch)
    cases.append(Case("char: dense", step, {**group, "kind": "dense", "params": params}))
    for layout in ("lowfreq", "random"):
        config = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout=layout)
        model = get_peft_model(char_model(device, dtype), config)
        step, params = _train_step(model, char_batch)
        cases.append(Case(f"char: replace {layout} K=mn/2", step, {**group, "kind": "replace", "params": params}))
        cases[-1].model = model

    ft_batch = torch.randint(0, 8192, (4, 512), generator=generator).to(device)
    group = {"model": "GPT-2 wide (4 x 768), c_attn", "tokens": ft_batch.numel(), "dtype": str(dtype).replace("torch.", "")}
    m, n = 3 * 768, 768
    rank = matched_lora_rank(m, n, finetune_k)
    arms = [
        ("finetune: LoRA r=8", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)),
        (f"finetune: LoRA r={rank} (matched)", LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)),
        (f"finetune: FourierFT K={finetune_k}", FourierFTConfig(n_frequency=finetune_k, target_modules=["c_attn"], fan_in_fan_out=True)),
        (f"finetune: spectral delta random K={finetune_k}", SpectralConfig(n_coefficients=finetune_k, layout="random", target_modules=["c_attn"], fan_in_fan_out=True)),
        (f"finetune: spectral delta lowfreq K={finetune_k}", SpectralConfig(n_coefficients=finetune_k, layout="lowfreq", target_modules=["c_attn"], fan_in_fan_out=True)),
    ]
    for name, config in arms:
        model = get_peft_model(finetune_model(device, dtype), config)
        step, params = _train_step(model, ft_batch)
        cases.append(Case(name, step, {**group, "kind": name.split(": ")[1].split(" ")[0], "params": params}))
        cases[-1].model = model
    return cases


def finish_model_cases(cases: list[Case], device: torch.device, memory: bool = True) -> None:
    from hf_spectral import SpectralLayer

    for case in cases:
        model = getattr(case, "model", None)
        if model is not None:
            paths = sorted({m.last_compute_path for m in model.modules() if isinstance(m, SpectralLayer)} - {None})
            if paths:
                case.info["path"] = ",".join(paths)
        if memory:
            case.peak_bytes = peak_memory(case.step, device)


def model_rows(results: list[dict]) -> list[dict]:
    out = []
    by_name = {r["name"]: r for r in results}
    dense = by_name.get("char: dense")
    lora8 = by_name.get("finetune: LoRA r=8")
    matched = next((r for r in results if r["name"].endswith("(matched)")), None)
    fourier = next((r for r in results if r["name"].startswith("finetune: FourierFT")), None)
    for r in results:
        r = dict(r)
        if r["name"].startswith("char"):
            r["x_reference"] = r["median_ms"] / dense["median_ms"] if dense else None
            r["x_reference_min"] = r["min_ms"] / dense["min_ms"] if dense else None
            r["reference"] = "dense"
        else:
            r["x_lora8"] = r["median_ms"] / lora8["median_ms"] if lora8 else None
            r["x_lora_matched"] = r["median_ms"] / matched["median_ms"] if matched else None
            r["x_fourierft"] = r["median_ms"] / fourier["median_ms"] if fourier else None
        out.append(r)
    return out
