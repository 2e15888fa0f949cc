"""Train one arm of the attention-vs-spectral-mixing comparison on characters, from scratch.

    python -m recipes.spectral_mixing.train recipes/spectral_mixing/configs/quick.yaml --arm mixer --seed 0 [key=value ...]

The profile (YAML) holds the settings every run shares (``defaults``) and a list of ``arms``; an arm's keys
override the defaults and ``key=value`` overrides both; a key that is not a field of ``Settings`` fails.
The arms: ``attention`` (a GPT-2 as built), ``mixer`` (the same model after ``replace_attention``, K matched to
the attention's parameter count) and ``mixer_spectral`` (the mixer model with every linear layer in replace-mode
spectral coefficients at ``spectral_fraction`` of mn: neither attention nor a dense weight matrix).
Each run writes ``run.json`` (settings, parameter counts, loss curve against tokens, validation curve against
tokens and training seconds (validation time left out), timings, hardware) under
``{runs_dir}/{profile}/{arm}/lr{learning_rate}/seed{seed}``; ``compare.py`` turns a folder of them into a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import hf_spectral  # noqa: F401  (registers the spectral PEFT method)
from hf_spectral import SpectralConfig
from hf_spectral.mixing import SpectralMixingConfig, parameter_counts, replace_attention
from hf_spectral.optim import create_optimizer
from recipes.common.profiles import load_profile, parse_args_with_overrides, parse_overrides

from .data import load

ARMS = ("attention", "mixer", "mixer_spectral")
FAMILIES = ("gpt2", "llama")

# the mixer model has both Conv1D (GPT-2's MLP) and nn.Linear (the mixer) layers; each is detected and handled
warnings.filterwarnings("ignore", message=r"fan_in_fan_out=.* does not match")


@dataclass
class Settings:
    arm: str = "mixer"
    # model: a 4-layer GPT-2, 128 wide (the char-Shakespeare recipe's block size)
    family: str = "gpt2"            # or llama: rotary positions, SwiGLU MLP (8/3 d wide), RMSNorm, no biases
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 256           # characters per window = the context the model sees
    dropout: float = 0.0            # short runs do not overfit
    # mixer
    n_atoms: int | None = None      # None: matched to the attention's parameter count
    max_half_life: float | None = None  # None: the block size (the longest memory worth starting with)
    reconstruction_weight: float = 0.0
    stft_weight: float = 0.0
    prior_weight: float = 0.0
    # replace-mode spectral linears (arm mixer_spectral)
    spectral_fraction: float = 0.5  # K = mn/2 per layer
    spectral_layout: str = "random"
    optimizer: str = "adamw"        # adamw, or wadam: hf_spectral.optim.SpectralAdamW (moments in the weight basis)
    # optimisation
    batch_size: int = 16
    max_steps: int = 300
    learning_rate: float = 2e-3     # a small model takes a large step
    min_lr_ratio: float = 0.1       # cosine down to 10% of the peak
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta2: float = 0.99             # few tokens per step: a shorter memory for the second moment
    grad_clip: float = 1.0
    # evaluation and bookkeeping
    eval_every: int = 100
    eval_batches: int = 20          # fixed validation windows (same for every arm and seed)
    eval_batch_size: int = 16
    seed: int = 0
    dataset: str = "shakespeare"    # or wikitext2 / ptb (Hub datasets; need internet)
    tokenizer: str = "char"         # char, bpe (trained on the training split), or a pretrained tokenizer's name/folder
    bpe_vocab: int = 4096           # tokenizer=bpe: its vocabulary
    input: str | None = None        # a local text file instead of the kept tiny Shakespeare
    runs_dir: str = "runs/spectral_mixing"
    profile: str = "adhoc"
    threads: int | None = None      # torch threads (None: torch's default)

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm={self.arm!r} is not one of {ARMS}")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {FAMILIES}: the base model the arms share")
        if self.optimizer not in ("adamw", "wadam"):
            raise ValueError(f"optimizer={self.optimizer!r}: use adamw or wadam")
        if not 0 < self.spectral_fraction <= 1:
            raise ValueError(f"spectral_fraction={self.spectral_fraction}: give a fraction of mn in (0, 1], e.g. 0.5")


def load_settings(profile_path: str | None, arm: str, seed: int, overrides: list[str]) -> Settings:
    """The profile's defaults, then the arm's keys, then ``key=value`` overrides (the recipes' one parser)."""
    values: dict = {}
    profile = "adhoc"
    if profile_path:
        profile_data = load_profile(profile_path)
        profile = profile_data["name"]
        values.update(profile_data["defaults"])
        arms = {a["arm"]: a for a in profile_data["arms"]}
        if arm not in arms:
            raise ValueError(f"--arm {arm!r} is not in {profile_path}: its arms are {sorted(arms)}")
        values.update(arms[arm])
    values.update(arm=arm, seed=seed, profile=profile)
    values.update(parse_overrides(overrides))
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; the known ones are {sorted(known)}")
    return Settings(**values)


def build_model(s: Settings, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(s.seed)
    if s.family == "llama":  # a modern attention baseline: positions by rotation, no table to learn
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=s.n_embd, intermediate_size=8 * (s.n_embd * 8 // 3 // 8),
            num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=s.n_head,
            max_position_embeddings=s.block_size, attention_dropout=s.dropout, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=s.block_size, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
            resid_pdrop=s.dropout, embd_pdrop=s.dropout, attn_pdrop=s.dropout, bos_token_id=0, eos_token_id=0,
        )
    model = AutoModelForCausalLM.from_config(config)
    if s.arm == "attention":
        return model
    mixing = SpectralMixingConfig(
        n_atoms=s.n_atoms,
        max_half_life=float(s.max_half_life or s.block_size),
        reconstruction_weight=s.reconstruction_weight,
        stft_weight=s.stft_weight,
        prior_weight=s.prior_weight,
    )
    model = replace_attention(model, mixing)
    if s.arm == "mixer":
        return model
    spectral = SpectralConfig(
        mode="replace", coefficient_fraction=s.spectral_fraction, layout=s.spectral_layout, seed=s.seed,
        target_modules="all-linear",
    )
    return get_peft_model(model, spectral)


def make_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    if s.optimizer == "wadam":
        return create_optimizer(model, lr=s.learning_rate, betas=(0.9, s.beta2), weight_decay=s.weight_decay)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=s.learning_rate, betas=(0.9, s.beta2))


def learning_rate(step: int, s: Settings) -> float:
    if step < s.warmup_steps:
        return s.learning_rate * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.learning_rate * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, data, s: Settings) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same windows for every arm and seed
    total = 0.0
    for _ in range(s.eval_batches):
        x, y = data.batch("val", s.eval_batch_size, s.block_size, generator)
        logits = model(input_ids=x).logits
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    model.train()
    return total / s.eval_batches


def trainable_and_stored(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable}


def run(s: Settings) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    data = load(s.input, s.dataset, s.tokenizer, s.bpe_vocab)
    model = build_model(s, data.vocab_size)
    counts = parameter_counts(model)
    counts.update(trainable_and_stored(model))
    optimizer = make_optimizer(model, s)
    generator = torch.Generator().manual_seed(10_000 + s.seed)
    curve, evals = [], []
    model.train()
    start = time.perf_counter()
    evaluating = 0.0  # seconds spent on validation, left out of the training time
    for step in range(s.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        x, y = data.batch("train", s.batch_size, s.block_size, generator)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = (step + 1) * s.batch_size * s.block_size
        curve.append([tokens, round(float(loss.detach()), 4)])
        if (step + 1) % s.eval_every == 0 or step + 1 == s.max_steps:
            eval_start = time.perf_counter()
            trained_for = eval_start - start - evaluating
            evals.append([tokens, round(validation_loss(model, data, s), 4), round(trained_for, 1)])
            evaluating += time.perf_counter() - eval_start
            print(f"{s.arm} lr {s.learning_rate:g} seed {s.seed} step {step + 1}: train {curve[-1][1]:.4f} "
                  f"val {evals[-1][1]:.4f} ({trained_for:.0f} s training)", flush=True)
    wall = time.perf_counter() - start - evaluating
    result = {
        "settings": dataclasses.asdict(s),
        "parameters": counts,
        "n_atoms": getattr(getattr(model, "config", None), "spectral_mixing", {}).get("n_atoms")
        if s.arm == "mixer" else _mixer_atoms(model),
        "train_curve": curve,
        "val_curve": evals,
        "val_loss": evals[-1][1],
        "best_val_loss": min(v for _, v, _ in evals),
        "unit": data.unit,
        "vocab_size": data.vocab_size,
        "tokens_per_word": round(data.tokens_per_word, 4),
        "val_word_perplexity": round(data.word_perplexity(evals[-1][1]), 2),
        "train_seconds": round(wall, 1),
        "tokens": s.max_steps * s.batch_size * s.block_size,
        "tokens_per_second": round(s.max_steps * s.batch_size * s.block_size / wall, 1),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "load_average_at_end": os.getloadavg()[0]},
        "data": data.source,
    }
    out = run_folder(s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(result, indent=1))
    return result


def run_folder(s: Settings) -> Path:
    """``{runs_dir}/{profile}/{arm}/lr{learning_rate}/seed{seed}``: one folder per point of the sweep."""
    return Path(s.runs_dir) / s.profile / s.arm / f"lr{s.learning_rate:g}" / f"seed{s.seed}"


def _mixer_atoms(model) -> int | None:
    for module in model.modules():
        if getattr(module, "is_spectral_mixer", False):
            return module.n_atoms
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", nargs="?", help="a YAML profile (configs/*.yaml)")
    parser.add_argument("--arm", default="mixer", choices=ARMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the profile")
    args = parse_args_with_overrides(parser, argv)
    result = run(load_settings(args.profile, args.arm, args.seed, args.overrides))
    print(json.dumps({k: result[k] for k in ("val_loss", "parameters", "train_seconds", "tokens_per_second")}))
    return result


if __name__ == "__main__":
    main()
