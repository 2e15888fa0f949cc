"""The compressors: each one turns the targeted linear layers of a dense model into fewer stored numbers.

Every compressor keeps the same count of stored numbers per layer, ``fraction * m * n`` (m x n = out x in):

============================  ======================================================================================
method                        what each targeted layer stores
============================  ======================================================================================
``spectral`` (layout, basis)  hf_spectral replace mode, ``init_weights="project"``: K coefficients of W in the DCT
                              (or a seeded random orthonormal) basis; ``energy`` keeps the K largest, ``lowfreq`` the
                              top-left block (no index set: the block follows from the shape and K)
``svd``                       W ~ B A with B = U_r S_r^1/2 (m x r) and A = S_r^1/2 V_r^T (r x n), r = K / (m + n)
``prune``                     the K largest |W_ij|, the rest zero (magnitude pruning in the weight basis)
``spectral_act``              activation-aware spectral: the K coefficients chosen and fitted to minimise the layer's
                              output error ||X W^T - X W_K^T|| on calibration inputs X (SparseGPT's optimal-brain-
                              surgeon sweep, run on the DCT coefficients), then loaded into a replace-mode hf_spectral
                              model, so the result is a real spectral model
``prune_act``                 the same sweep in the weight basis (SparseGPT itself): the activation-aware peer of prune
``svd_act``                   SVD-LLM: truncated SVD of W L with G = X^T X = L L^T, then B A = trunc(W L) L^-1
============================  ======================================================================================

Storage is counted in bytes from the tensors each method keeps: values in their dtype, plus an index set where the
kept positions are data-dependent (``energy`` layouts and pruning), as int32 (4 bytes a position) or as a bitmap of
m x n bits, whichever is smaller (the bitmap wins for every fraction above 1/32). Bases, structured layouts and SVD
factors need no index. Parameters outside the targeted layers (embeddings, norms) are counted dense.

Activation-aware fitting, in one paragraph: with inputs X (tokens x n) the output error of W_K is
``||X (W - W_K)^T||_F``. Writing W = C_m^T S C_n, it equals ``||X~ (S - S_K)^T||_F`` with X~ = X C_n^T, because C_m
is orthonormal: the coefficients S are an ordinary linear layer whose inputs are the DCT of the activations, with
Hessian H = C_n X^T X C_n^T. Keeping K of them with least output error is then SparseGPT's problem, solved the same
way (column blocks, each block's kept set chosen by w^2 / [H^-1]_jj^2, the dropped ones' error pushed into the
columns not yet processed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hf_spectral import SpectralConfig, SpectralLayer

# SmolLM2 / Llama block linears; the head (tied to the embedding) and the embedding stay dense.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("spectral", "svd", "prune", "spectral_act", "prune_act", "svd_act")
ACTIVATION_AWARE = ("spectral_act", "prune_act", "svd_act")
INDEX_BYTES = 4  # int32 positions


@dataclass(frozen=True)
class Method:
    """One compressor with its settings (``name`` is the run's folder and the table's row)."""

    name: str
    kind: str  # one of METHODS
    layout: str = "energy"  # spectral only
    basis: str = "dct"  # spectral only

    def __post_init__(self):
        if self.kind not in METHODS:
            raise ValueError(f"method kind={self.kind!r} is not one of {METHODS}.")


def index_bytes(kept: int, m: int, n: int) -> tuple[int, str]:
    """Bytes of an index set of ``kept`` positions in an m x n matrix: int32 or a bitmap, whichever is smaller."""
    as_int32, as_bitmap = INDEX_BYTES * kept, math.ceil(m * n / 8)
    return (as_int32, "int32") if as_int32 <= as_bitmap else (as_bitmap, "bitmap")


def budget(m: int, n: int, fraction: float) -> int:
    """K, the stored numbers of an m x n layer (the rounding hf_spectral's coefficient_fraction uses)."""
    return max(1, round(fraction * m * n))


def svd_rank(m: int, n: int, fraction: float) -> int:
    """The rank whose factors r (m + n) come closest to, without passing, the layer's budget."""
    return max(1, min(min(m, n), budget(m, n, fraction) // (m + n)))


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES
    }


# --------------------------------------------------------------------------------------------------
# the modules the baselines leave in the model


class LowRankLinear(nn.Module):
    """y = B (A x) (+ bias): the two factors of a truncated SVD, trainable."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.rank = a.shape[1], b.shape[0], a.shape[0]
        self.a = nn.Parameter(a.contiguous())
        self.b = nn.Parameter(b.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.a), self.b, self.bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --------------------------------------------------------------------------------------------------
# bases and the activation-aware sweep (pure functions of tensors)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix, rows are basis vectors: C[f, i] = a_f cos(pi (2i + 1) f / (2n))."""
    f = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * f / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def obs_sparsify(w: torch.Tensor, hessian: torch.Tensor, keep: int, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Keep exactly ``keep`` entries of w (m x n) minimising ||X (w - w_K)^T||_F for inputs with X^T X = hessian.

    SparseGPT's sweep (Frantar & Alistarh 2023): columns in blocks of ``block``; in each block the kept entries are
    the largest w_ij^2 / [H^-1]_jj^2 (``keep`` is shared among blocks by their width), and each column's pruning error
    is pushed into the columns to its right through the Cholesky factor of H^-1. ``damp`` (a fraction of H's mean
    diagonal) keeps H invertible. float64 throughout.
    """
    m, n = w.shape
    w = w.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    target = [round(keep * min(i, n) / n) for i in range(0, n + block, block)]
    for b, i1 in enumerate(range(0, n, block)):
        i2 = min(i1 + block, n)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        score = (w1**2 / torch.diagonal(h1).unsqueeze(0) ** 2).flatten()
        kept = torch.zeros(score.numel(), dtype=torch.bool)
        kept[torch.topk(score, target[b + 1] - target[b]).indices] = True
        kept = kept.view_as(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.where(kept[:, i], col, torch.zeros_like(col))
            out[:, i1 + i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return out


def whitened_svd(w: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: B (m x r), A (r x n) with B A = trunc_r(W L) L^-1, G = L L^T; the least output error at rank r."""
    n = w.shape[1]
    g = gram.detach().to(torch.float64)
    g = g + damp * torch.diagonal(g).mean() * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(g)
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64) @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = torch.linalg.solve_triangular(chol, root.unsqueeze(1) * vh[:rank], upper=False, left=False)  # a L = S^1/2 V^T
    return b, a


# --------------------------------------------------------------------------------------------------
# compressors: model (dense, loaded) -> (model, storage record)


def compress(model: nn.Module, method: Method, fraction: float, grams: Optional[dict] = None) -> tuple[nn.Module, dict]:
    """Compress ``model``'s targeted layers in place (spectral: the PeftModel) and count its storage in bytes."""
    if method.kind in ACTIVATION_AWARE and grams is None:
        raise ValueError(f"{method.name} is activation-aware: pass the calibration Gram matrices (calibration_grams).")
    dense = dense_bytes(model)
    if method.kind in ("spectral", "spectral_act"):
        model = _spectral(model, method, fraction, grams)
        layers = spectral_storage(model, method.layout if method.kind == "spectral" else "energy")
    elif method.kind in ("svd", "svd_act"):
        layers = _svd(model, fraction, grams if method.kind == "svd_act" else None)
    else:
        layers = _prune(model, fraction, grams if method.kind == "prune_act" else None)
    return model, storage_record(model, layers, dense)


def _spectral(model: nn.Module, method: Method, fraction: float, grams: Optional[dict]) -> nn.Module:
    from peft import get_peft_model

    layout, basis = method.layout, method.basis
    fitted = {}
    if method.kind == "spectral_act":
        if basis != "dct":
            raise ValueError("spectral_act is written for basis='dct'.")
        # Fit S_K per layer, then write W_K = C_m^T S_K C_n into the dense layer: the energy layout's K largest
        # |DCT(W_K)| are then exactly the fitted coefficients and the projection reads their values back.
        layout = "energy"
        for name, linear in target_linears(model).items():
            m, n = linear.weight.shape
            cm, cn = dct_matrix(m), dct_matrix(n)
            s = cm @ linear.weight.detach().double() @ cn.T
            s_k = obs_sparsify(s, cn @ grams[name].double() @ cn.T, budget(m, n, fraction))
            fitted[name] = s_k
            linear.weight.data.copy_((cm.T @ s_k @ cn).to(linear.weight.dtype))
    config = SpectralConfig(
        mode="replace", coefficient_fraction=fraction, layout=layout, basis=basis, init_weights="project",
        target_modules=list(TARGET_MODULES),
    )
    model = get_peft_model(model, config)
    for name, s_k in fitted.items():  # the model holds what was fitted (same support, same values)
        layer = model.get_submodule("base_model.model." + name)
        held = layer.spectral_coefficients["default"].detach().double().abs().sort().values
        want = s_k[s_k != 0].abs().sort().values
        if held.shape != want.shape or (held - want).norm() > 1e-4 * want.norm():
            raise RuntimeError(f"{name}: the spectral model does not hold the fitted coefficients.")
    return model


def _svd(model: nn.Module, fraction: float, grams: Optional[dict]) -> list[dict]:
    layers = []
    for name, linear in target_linears(model).items():
        w = linear.weight.detach()
        m, n = w.shape
        r = svd_rank(m, n, fraction)
        if grams is None:
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            root = s[:r].sqrt()
            b, a = u[:, :r] * root, root.unsqueeze(1) * vh[:r]
        else:
            b, a = whitened_svd(w, grams[name], r)
        low = LowRankLinear(a.to(w.dtype), b.to(w.dtype), linear.bias)
        _set_module(model, name, low)
        layers.append(dict(name=name, m=m, n=n, stored=low.a.numel() + low.b.numel(),
                           bytes=low.a.numel() * low.a.element_size() + low.b.numel() * low.b.element_size(),
                           index="none", rank=r))
    return layers


def _prune(model: nn.Module, fraction: float, grams: Optional[dict]) -> list[dict]:
    layers = []
    for name, linear in target_linears(model).items():
        w = linear.weight.detach()
        m, n = w.shape
        k = budget(m, n, fraction)
        if grams is None:
            mask = torch.zeros(m * n, dtype=torch.bool)
            mask[torch.topk(w.abs().flatten(), k).indices] = True
            mask = mask.view(m, n)
            linear.weight.data.mul_(mask)
        else:
            new = obs_sparsify(w, grams[name], k)
            mask = new != 0
            linear.weight.data.copy_(new.to(w.dtype))
        linear.register_buffer("prune_mask", mask, persistent=False)  # heal.py keeps pruned weights at zero
        kept = int(mask.sum())
        idx, kind = index_bytes(kept, m, n)
        layers.append(dict(name=name, m=m, n=n, stored=kept, bytes=kept * w.element_size() + idx, index=kind))
    return layers


# --------------------------------------------------------------------------------------------------
# storage


def dense_bytes(model: nn.Module) -> dict:
    """Bytes of the dense model's parameters (tied ones once) and of its targeted layers' weights."""
    targeted = sum(layer.weight.numel() * layer.weight.element_size() for layer in target_linears(model).values())
    return dict(model=_parameter_bytes(model), targeted=targeted)


def _parameter_bytes(model: nn.Module, skip: tuple = ()) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen or any(name.startswith(s + ".") or name == s for s in skip):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def spectral_storage(model: nn.Module, layout: str) -> list[dict]:
    """Each spectral layer's stored coefficients and the bytes they and their index set take (from the tensors)."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, SpectralLayer):
            continue
        values = module.spectral_coefficients["default"]
        m, n, k = module.out_features, module.in_features, values.numel()
        idx, kind = index_bytes(k, m, n) if layout in ("energy", "banded") else (0, "none")
        layers.append(dict(name=name, m=m, n=n, stored=k, bytes=k * values.element_size() + idx, index=kind))
    return layers


def storage_record(model: nn.Module, layers: list[dict], dense: dict) -> dict:
    """Totals: targeted layers compressed, everything else (embeddings, norms) counted dense."""
    compressed = sum(layer["bytes"] for layer in layers)
    rest = dense["model"] - dense["targeted"]
    kinds = sorted({layer["index"] for layer in layers})
    return dict(
        layers=len(layers),
        stored_numbers=sum(layer["stored"] for layer in layers),
        dense_numbers=sum(layer["m"] * layer["n"] for layer in layers),
        targeted_bytes=compressed,
        dense_targeted_bytes=dense["targeted"],
        model_bytes=compressed + rest,
        dense_model_bytes=dense["model"],
        index=",".join(kinds),
        ranks=sorted({layer["rank"] for layer in layers if "rank" in layer}) or None,
    )


# --------------------------------------------------------------------------------------------------
# calibration


@torch.no_grad()
def calibration_grams(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """G = X^T X (float64, n x n) of every targeted layer's inputs over the calibration token batches.

    All layers see the dense model's activations (one pass), not the partly compressed model's.
    """
    grams, hooks = {}, []
    for name, linear in target_linears(model).items():
        grams[name] = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)

        def hook(module, args, output, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] += x.T @ x

        hooks.append(linear.register_forward_hook(hook))
    try:
        model.eval()
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return grams
