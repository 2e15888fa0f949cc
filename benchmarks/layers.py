"""Layer level: one linear layer's forward + backward, spectral against nn.Linear, LoRA and FourierFT.

Every case is one layer of shape (out m, in n) fed T tokens. The input requires a gradient (a layer
inside a network passes one back), trainable parameters get theirs, and gradients are reset to None
after each step (as ``zero_grad(set_to_none=True)`` does), so no case pays for accumulation.
"""

from __future__ import annotations

import torch
from peft import FourierFTConfig, LoraConfig, get_peft_model
from torch import nn

import hf_spectral  # noqa: F401  (registers the method)
from hf_spectral import SpectralConfig
from hf_spectral.compute import dispatch

from .common import Case, peak_memory

SHAPES = [(768, 768), (2048, 2048), (4096, 4096), (768, 3072)]
TOKENS = [512, 4096]
REPLACE_FRACTIONS = {"mn/2": 0.5, "mn/8": 0.125}
DELTA_BUDGETS = [1000, 10000, 65536]
LAYOUTS = ["lowfreq", "random"]


class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one layer named ``layer``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def matched_lora_rank(m: int, n: int, k: int) -> int:
    return max(1, round(k / (m + n)))


def _linear(m, n, device, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, m).to(device=device, dtype=dtype)


def _peft_layer(config, m, n, device, dtype):
    model = get_peft_model(_Holder(_linear(m, n, device, dtype)), config)
    return model.base_model.model.layer


def _trainable(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def _train_step(module, x, grad_out):
    params = _trainable(module)

    def step():
        out = module(x)
        out.backward(grad_out)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def _eval_step(module, x):
    def step():
        with torch.no_grad():
            module(x)

    return step


def build_layer_cases(
    m: int,
    n: int,
    tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    all_paths: bool = False,
    budgets: list[int] = DELTA_BUDGETS,
    fractions: dict = REPLACE_FRACTIONS,
    layouts: list[str] = LAYOUTS,
    kinds: tuple = ("linear", "replace", "delta", "lora", "fourierft", "eval"),
) -> list[Case]:
    """The benchmark table for one shape and token count."""
    torch.manual_seed(0)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, m, device=device, dtype=dtype)
    group = {"m": m, "n": n, "tokens": tokens, "dtype": str(dtype).replace("torch.", "")}
    cases: list[Case] = []

    def add(name, module, info, train=True, layer=None):
        step = _train_step(module, x, grad_out) if train else _eval_step(module, x.detach())
        params = sum(p.numel() for p in _trainable(module)) if train else None
        cases.append(Case(name, step, {**group, "kind": info.pop("kind"), "train": train, "params": params, **info}))
        cases[-1].layer = layer

    if "linear" in kinds:
        add("nn.Linear", _linear(m, n, device, dtype), {"kind": "linear"})

    def spectral(mode, layout, budget, label, path="auto"):
        kwargs = {"coefficient_fraction": budget} if mode == "replace" else {"n_coefficients": budget}
        config = SpectralConfig(
            mode=mode, layout=layout, target_modules=["layer"], init_weights=False if mode == "delta" else "random", **kwargs
        )
        layer = _peft_layer(config, m, n, device, dtype)
        layer.compute_path = path
        k = layer.spectral_coefficients["default"].numel()
        name = f"{mode} {layout} K={label}" + ("" if path == "auto" else f" [{path}]")
        add(name, layer, {"kind": mode, "layout": layout, "k": k, "budget": label, "forced_path": path}, layer=layer)
        return layer

    if "replace" in kinds:
        for label, fraction in fractions.items():
            for layout in layouts:
                layer = spectral("replace", layout, fraction, label)
                if all_paths:
                    for path in dispatch.available_paths(layer.coefficient_space("default"), "replace"):
                        spectral("replace", layout, fraction, label, path)
    if "delta" in kinds:
        for k in budgets:
            if k > m * n:
                continue
            for layout in layouts:
                layer = spectral("delta", layout, k, str(k))
                if all_paths:
                    for path in dispatch.available_paths(layer.coefficient_space("default"), "delta"):
                        spectral("delta", layout, k, str(k), path)
    if "lora" in kinds:
        ranks = {8: "r=8"}
        for k in budgets:
            if k <= m * n:
                ranks.setdefault(matched_lora_rank(m, n, k), f"r={matched_lora_rank(m, n, k)}")
        for r in sorted(ranks):
            config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["layer"])
            add(f"LoRA r={r}", _peft_layer(config, m, n, device, dtype), {"kind": "lora", "rank": r})
    if "fourierft" in kinds:
        for k in budgets:
            if k <= m * n:
                config = FourierFTConfig(n_frequency=k, target_modules=["layer"])
                add(f"FourierFT K={k}", _peft_layer(config, m, n, device, dtype), {"kind": "fourierft", "k": k})
    if "eval" in kinds:
        # forward only, no gradients: what evaluation and generation pay
        add("eval nn.Linear", _linear(m, n, device, dtype), {"kind": "eval-linear"}, train=False)
        k = max(b for b in budgets if b <= m * n)
        for mode, layout, budget, label in (("delta", "random", k, str(k)), ("replace", "random", 0.5, "mn/2")):
            kwargs = {"coefficient_fraction": budget} if mode == "replace" else {"n_coefficients": budget}
            config = SpectralConfig(
                mode=mode, layout=layout, target_modules=["layer"], init_weights=False if mode == "delta" else "random", **kwargs
            )
            model = get_peft_model(_Holder(_linear(m, n, device, dtype)), config)
            layer = model.base_model.model.layer
            add(f"eval {mode} {layout} K={label} (cached)", layer, {"kind": "eval-cached", "budget": label}, train=False, layer=layer)
            merged = get_peft_model(_Holder(_linear(m, n, device, dtype)), config).merge_and_unload().layer
            add(f"eval {mode} {layout} K={label} (merged)", merged, {"kind": "eval-merged", "budget": label}, train=False)
        # without the cache: a small low-frequency block computed in factored form, never built
        config = SpectralConfig(mode="replace", layout="lowfreq", coefficient_fraction=0.125, target_modules=["layer"], init_weights="random")
        layer = get_peft_model(_Holder(_linear(m, n, device, dtype)), config).base_model.model.layer
        layer.cache_weights = False
        add("eval replace lowfreq K=mn/8 (no cache)", layer, {"kind": "eval-uncached", "budget": "mn/8"}, train=False, layer=layer)
    return cases


def finish_cases(cases: list[Case], device: torch.device, memory: bool = True) -> None:
    """Record the path each spectral case took, and its peak memory (one extra step each)."""
    for case in cases:
        layer = getattr(case, "layer", None)
        if layer is not None:
            case.info["path"] = layer.last_compute_path
        if memory:
            case.peak_bytes = peak_memory(case.step, device)


def layer_rows(results: list[dict]) -> list[dict]:
    """Ratios within each (shape, tokens) group, from medians measured in the same run."""
    out = []
    groups = {}
    for r in results:
        groups.setdefault((r["m"], r["n"], r["tokens"]), []).append(r)
    for (m, n, _tokens), rows in groups.items():
        by_name = {r["name"]: r for r in rows}
        linear = by_name.get("nn.Linear")
        eval_linear = by_name.get("eval nn.Linear")
        lora8 = by_name.get("LoRA r=8")
        for r in rows:
            r = dict(r)
            base = eval_linear if not r["train"] else linear
            r["x_linear"] = r["median_ms"] / base["median_ms"] if base else None
            r["x_linear_min"] = r["min_ms"] / base["min_ms"] if base else None  # the least disturbed runs
            r["x_lora8"] = r["median_ms"] / lora8["median_ms"] if lora8 and r["train"] else None
            if r["kind"] == "delta":
                k = int(r["budget"])
                matched = by_name.get(f"LoRA r={matched_lora_rank(m, n, k)}")
                fourier = by_name.get(f"FourierFT K={k}")
                r["x_lora_matched"] = r["median_ms"] / matched["median_ms"] if matched else None
                r["x_fourierft"] = r["median_ms"] / fourier["median_ms"] if fourier else None
                r["x_lora_matched_min"] = r["min_ms"] / matched["min_ms"] if matched else None
                r["x_fourierft_min"] = r["min_ms"] / fourier["min_ms"] if fourier else None
                if matched and r.get("peak_mib") is not None and matched.get("peak_mib") is not None:
                    itemsize = torch.finfo(getattr(torch, r["dtype"])).bits // 8
                    r["extra_peak_mn"] = (r["peak_mib"] - matched["peak_mib"]) * 2**20 / (m * n * itemsize)
            out.append(r)
    return out
