"""Model level: one optimizer step (forward, backward, AdamW) of whole models.

- The seed paper's character model (GPT-2 layout, 4 layers, 128 dims, 4 heads, context 128, 65
  characters; batch 32 x 128 tokens): dense against replace mode at K = mn/2 in every block linear.
  Dense + AdamW against replace mode + AdamW and + ``SpectralAdamW`` (the paper's optimiser).
- A fine-tuning step on a GPT-2-small-wide model (4 layers of 768 dims, 12 heads, vocabulary 8192,
  batch 4 x 512 tokens; built from its config, since the cost does not depend on the weights'
  values): spectral delta against LoRA and FourierFT on ``c_attn`` (PEFT's default for GPT-2) at
  matched trainable parameters.
- A SmolLM2-135M-shaped Llama (HuggingFaceTB/SmolLM2-135M's config: 30 blocks of 576 dims, 9 heads, 3
  key-value heads, MLP 1536, vocabulary 49152, tied head; random weights), all 7 projections of every
  block: spectral delta K = 1000 (``random``, ``lowfreq``, ``grid`` and ``sparse_grid``; ``sparse_grid@128`` sets its
  ``grid_rank``) against LoRA r = 8 (and LoRA at other ranks: ``lora@32``), one sequence of 128, 512 and 2,048
  tokens a step.

Token ids are random: the time of a step does not depend on the text.
"""

from __future__ import annotations

import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_spectral
from hf_spectral import SpectralConfig

from .common import Case, peak_memory
from .layers import matched_lora_rank

MODEL_GROUPS = ("char", "finetune", "smollm2")
SMOLLM2_TOKENS = (128, 512, 2048)
SMOLLM2_LAYOUTS = ("random", "lowfreq", "grid", "sparse_grid")  # spectral delta K = 1000 arms, beside LoRA r=8
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def smollm2_model(device, dtype) -> LlamaForCausalLM:
    """HuggingFaceTB/SmolLM2-135M's architecture from its config (random weights: a step's cost does not depend
    on their values)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def _train_step(model, batch, lr=1e-3, spectral_adamw=False):
    params = [p for p in model.parameters() if p.requires_grad]
    if spectral_adamw:
        from hf_spectral.optim import create_optimizer

        optimizer = create_optimizer(model, lr=lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def build_model_cases(
    device: torch.device,
    dtype: torch.dtype,
    finetune_k: int = 65536,
    groups: tuple = MODEL_GROUPS,
    smollm2_tokens: tuple = SMOLLM2_TOKENS,
    smollm2_paths: tuple = (),
    smollm2_layouts: tuple = SMOLLM2_LAYOUTS,
) -> list[Case]:
    cases = []
    generator = torch.Generator().manual_seed(0)
    if "char" in groups:
        cases += _char_cases(device, dtype, generator)
    if "finetune" in groups:
        cases += _finetune_cases(device, dtype, generator, finetune_k)
    if "smollm2" in groups:
        cases += _smollm2_cases(device, dtype, generator, smollm2_tokens, smollm2_paths, smollm2_layouts)
    return cases


def _char_cases(device, dtype, generator) -> list[Case]:
    cases = []
    char_batch = torch.randint(0, 65, (32, 128), generator=generator).to(device)
    group = {"model": "char (4 x 128)", "tokens": char_batch.numel(), "dtype": str(dtype).replace("torch.", "")}
    step, params = _train_step(char_model(device, dtype), char_batch)
    cases.append(Case("char: dense", step, {**group, "kind": "dense", "params": params}))
    for layout, spectral_adamw in (("lowfreq", False), ("lowfreq", True), ("random", False), ("random", True)):
        config = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout=layout)
        model = get_peft_model(char_model(device, dtype), config)
        step, params = _train_step(model, char_batch, spectral_adamw=spectral_adamw)
        optimizer = "SpectralAdamW" if spectral_adamw else "AdamW"
        cases.append(Case(f"char: replace {layout} K=mn/2 + {optimizer}", step, {**group, "kind": "replace", "params": params}))
        cases[-1].model = model
    return cases


def _smollm2_cases(device, dtype, generator, token_counts, forced_paths=(), layouts=SMOLLM2_LAYOUTS) -> list[Case]:
    cases = []
    random_k1000 = SpectralConfig(n_coefficients=1000, layout="random", target_modules=SMOLLM2_TARGETS)
    arms = [("LoRA r=8", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=SMOLLM2_TARGETS), "auto")]
    for spec in layouts:  # "layout", "sparse_grid@<grid_rank>" or "lora@<rank>"
        layout, _, rank = spec.partition("@")
        if layout == "lora":
            config = LoraConfig(r=int(rank), lora_alpha=16, lora_dropout=0.0, target_modules=SMOLLM2_TARGETS)
            arms.append((f"LoRA r={rank}", config, "auto"))
            continue
        extra = {"grid_rank": int(rank)} if rank else {}
        config = SpectralConfig(n_coefficients=1000, layout=layout, target_modules=SMOLLM2_TARGETS, **extra)
        arms.append((f"spectral delta {spec} K=1000", config, "auto"))
    arms += [(f"spectral delta random K=1000, {path} forced", random_k1000, path) for path in forced_paths]
    batches = {t: torch.randint(0, 49152, (1, t), generator=generator).to(device) for t in token_counts}
    for name, config, path in arms:
        model = get_peft_model(smollm2_model(device, dtype), config)
        if path != "auto":
            hf_spectral.set_compute_path(model, path)
        for tokens, batch in batches.items():
            step, params = _train_step(model, batch)
            group = {"model": "SmolLM2-135M-shaped, 7 projections", "tokens": tokens, "dtype": str(dtype).replace("torch.", "")}
            cases.append(Case(f"smollm2 {tokens}: {name}", step, {**group, "kind": name.split(" ")[0], "params": params}))
            cases[-1].model = model
    return cases


def _finetune_cases(device, dtype, generator, finetune_k) -> list[Case]:
    cases = []
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
        if memory:
            case.peak_bytes = peak_memory(case.step, device)
        elif model is not None:
            case.step()  # models are shared across token counts: the paths of this case's own step
        if model is not None:
            layers = [m for m in model.modules() if isinstance(m, SpectralLayer)]
            counts = {}
            for layer in layers:
                counts[layer.last_compute_path] = counts.get(layer.last_compute_path, 0) + 1
            if layers:
                case.info["path"] = ",".join(f"{path} {count}" for path, count in sorted(counts.items(), key=str))


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
        elif r["name"].startswith("smollm2"):
            lora = by_name.get(f"smollm2 {r['tokens']}: LoRA r=8")
            r["x_lora8"] = r["median_ms"] / lora["median_ms"] if lora else None
            r["x_lora8_min"] = r["min_ms"] / lora["min_ms"] if lora else None
        else:
            r["x_lora8"] = r["median_ms"] / lora8["median_ms"] if lora8 else None
            r["x_lora_matched"] = r["median_ms"] / matched["median_ms"] if matched else None
            r["x_fourierft"] = r["median_ms"] / fourier["median_ms"] if fourier else None
        out.append(r)
    return out
