"""Adam for spectral coefficients, with its statistics in the weight basis.

Why: a replace-mode layer trains K coefficients S of ``W = B_m^T S B_n``. Plain Adam normalises
every coordinate of S by its own running RMS; in the DCT basis a coordinate is a global cosine
pattern of W, not a weight, and that normalisation is a different (worse) preconditioner than
Adam's on W. Measured on char-level Shakespeare (``recipes/shakespeare_char``): with all m x n
coefficients kept (the same functions as dense, an orthonormal change of basis) plain AdamW on S
still trails dense AdamW; with the statistics below it matches it.

What: ``SpectralAdamW`` keeps Adam's statistics for the layer's weight, not its coefficients.
Per step and layer, with g = dL/dS (K numbers) and Omega the kept index set:

    G = lift(g)         = B_m^T scatter_Omega(g) B_n     the gradient's part in the kept subspace, m x n
    m = b1 m + (1-b1) g                                  first moment: lift is linear, so keeping it on
                                                         the K coefficients is exactly Adam's on G
    v = b2 v + (1-b2) G*G                                second moment in the weight basis
    U = lift(m_hat) / (sqrt(v_hat) + eps)                Adam's direction for W
    S = S - lr * restrict(U) - lr * wd * S               restrict(U) = (B_m U B_n^T) on Omega: the
                                                         L2-nearest change of S to the step U on W

``moments="weight"``: v is the full m x n matrix (K + mn numbers per layer; dense AdamW keeps 2mn).
With K = mn this is AdamW on W, step for step.
``moments="factored"``: v is factored into row and column statistics of G*G, as Adafactor does
(``v ~ r c^T / mean(r)``): K + m + n numbers per layer, memory that does not grow with m x n.
``moments="coefficient"``: plain AdamW on S (the baseline), for comparisons in one code path.

Costs per spectral layer and step: two inverse transforms (the gradient and the first moment)
and one forward transform. Every layout (block and scattered) and both bases are supported.
Parameters that are not spectral coefficients (embeddings, norms, biases, a dense head) get
plain AdamW from the same optimiser.

With ``transformers.Trainer``::

    from hf_spectral.optim import create_optimizer
    trainer = Trainer(model=model, args=args, ..., optimizers=(create_optimizer(model, args), None))

The learning-rate schedule is then built by Trainer from ``args`` as usual. The same settings
that suit AdamW on a dense model suit this optimiser (lr, betas, eps, weight decay carry over).

Step size with few coefficients: Adam's direction U on W has entries of about 1, so its norm is
about sqrt(mn), and restrict(U) keeps a good part of it (all of it where U lies in the span of the K
kept basis matrices). So each coefficient moves by up to lr * sqrt(mn / K), where AdamW on S moves
each by about lr. Measured over three steps on a random layout: 1.3x AdamW's step at K = mn/2
(sqrt(mn/K) = 1.4; AdamW's rates carry over), but 6x and 8.5x for a delta of K = 1000 on 384 x 384
and 1536 x 384 layers (sqrt(mn/K) = 12 and 24). With few coefficients, start from the rate that suits
AdamW on the coefficients divided by about sqrt(mn / K) / 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

try:  # FSDP2 (fully_shard) holds parameters as DTensors
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a torch without torch.distributed.tensor
    DTensor = Replicate = None

__all__ = [
    "MOMENTS",
    "CoefficientProjector",
    "SpectralAdamW",
    "create_optimizer",
    "optimizer_state_elements",
    "spectral_projectors",
]

MOMENTS = ("weight", "factored", "coefficient")


class CoefficientProjector:
    """Maps one spectral layer's K coefficients to the m x n weight basis and back.

    ``lift(c)`` is the m x n matrix whose coefficients are ``c`` on the index set (and zero
    elsewhere); ``restrict(U)`` is the coefficients of ``U`` on the index set. Both are the layer's
    ``CoefficientSpace`` maps, exact (the bases are orthonormal), and ``restrict(lift(c)) == c``.

    The projector keeps a reference to the layer and asks it for its coefficient space at call time,
    so it follows the layer across devices and reloads.
    """

    def __init__(self, layer, adapter: str = "default"):
        self.layer = layer
        self.adapter = adapter
        self.m, self.n = layer.out_features, layer.in_features

    def lift(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.layer.coefficient_space(self.adapter).to_matrix(coefficients)

    def restrict(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.layer.coefficient_space(self.adapter).from_matrix(matrix)


def spectral_projectors(model: nn.Module) -> dict[nn.Parameter, CoefficientProjector]:
    """A projector for every spectral coefficient tensor of ``model`` (a PeftModel or its base)."""
    from .model import spectral_layers

    return {
        param: CoefficientProjector(layer, adapter)
        for _, layer in spectral_layers(model)
        for adapter, param in layer.spectral_coefficients.items()
    }


class SpectralAdamW(torch.optim.Optimizer):
    """AdamW whose statistics for spectral coefficients live in the weight basis (see the module doc).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        projectors (`Mapping[Parameter, CoefficientProjector]`): which parameters are spectral
            coefficients, usually ``spectral_projectors(model)``. Parameters without one get AdamW.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (weight decay is decoupled).
        moments (`str`): ``"weight"`` (full second moment in the weight basis, K + mn numbers per
            layer), ``"factored"`` (row and column statistics, K + m + n) or ``"coefficient"``
            (plain AdamW on the coefficients). A group may override it with its own ``moments``.
    """

    def __init__(
        self,
        params: Iterable,
        projectors: Optional[Mapping[nn.Parameter, CoefficientProjector]] = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moments: str = "weight",
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r} must be >= 0, e.g. 1e-3.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas!r} must each lie in [0, 1), e.g. (0.9, 0.99).")
        if not eps > 0.0:
            raise ValueError(f"eps={eps!r} must be > 0, e.g. 1e-8.")
        if moments not in MOMENTS:
            raise ValueError(f"moments={moments!r} is not one of {MOMENTS}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, moments=moments)
        super().__init__(params, defaults)
        # keyed by parameter identity; not part of state_dict (rebuilt from the model on resume)
        self.projectors = dict(projectors or {})

    def _check_parameters(self) -> None:
        """Raise before anything moves if a wrapper replaced the coefficients by tensors of its own."""
        if not self.projectors or all(g["moments"] == "coefficient" for g in self.param_groups):
            return
        # ZeRO and FSDP1 step flat tensors of their own: then not one stepped tensor is a known coefficient tensor
        stepped = [p for g in self.param_groups for p in g["params"]]
        trainable = sum(p.requires_grad for p in self.projectors)
        if trainable and not any(p in self.projectors for p in stepped):
            raise RuntimeError(
                f"SpectralAdamW has projectors for {trainable} trainable spectral coefficient tensors, and none of them "
                f"is among the {len(stepped)} tensors it is asked to step: a wrapper replaced the model's parameters "
                "by copies of its own. DeepSpeed ZeRO (stages 1-3) steps flattened fp32 partitions (and FSDP1 flat "
                "parameters), on which the weight-basis statistics cannot be computed: the step would silently be "
                "plain AdamW. SpectralAdamW works in one process, under DDP (torch or Accelerate) and under FSDP2 "
                "(fully_shard, the optimiser built after sharding). Under DeepSpeed use its AdamW "
                '("optimizer": {"type": "AdamW"} in the config) or moments="coefficient"; with several optimisers, '
                "give each only the projectors of its own parameters."
            )

    @torch.no_grad()
    def step(self, closure=None):
        self._check_parameters()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SpectralAdamW does not support sparse gradients.")
                projector = self.projectors.get(param)
                moments = group["moments"] if projector is not None else "coefficient"
                # Under FSDP2 a rank holds a shard of the K coefficients, and the weight-basis statistics need all
                # of them: step the gathered tensor (the same on every rank; the state is then whole on each rank)
                # and keep this rank's shard of the result.
                target, grad = param, param.grad
                if moments != "coefficient" and DTensor is not None and isinstance(param, DTensor):
                    target, grad = param.full_tensor(), grad.full_tensor()
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                    if moments == "weight":
                        state["exp_avg_sq"] = target.new_zeros(projector.m, projector.n)
                    elif moments == "factored":
                        state["exp_avg_sq_row"] = target.new_zeros(projector.m)
                        state["exp_avg_sq_col"] = target.new_zeros(projector.n)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                if wd != 0.0:
                    target.mul_(1.0 - lr * wd)
                exp_avg = state["exp_avg"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                correction1 = 1.0 - beta1**step
                correction2 = 1.0 - beta2**step
                if moments == "coefficient":
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    denom = (exp_avg_sq / correction2).sqrt_().add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-lr / correction1)
                    continue
                lifted_grad = projector.lift(grad)
                if moments == "weight":
                    exp_avg_sq = state["exp_avg_sq"]
                    exp_avg_sq.mul_(beta2).addcmul_(lifted_grad, lifted_grad, value=1.0 - beta2)
                    second = exp_avg_sq / correction2
                else:
                    squared = lifted_grad.square()
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.lerp_(squared.mean(dim=1), 1.0 - beta2)
                    col.lerp_(squared.mean(dim=0), 1.0 - beta2)
                    # rank-1 estimate of the m x n second moment: r_i c_j / mean(r) (Adafactor)
                    second = torch.outer(row, col) / (row.mean().clamp_min(1e-30) * correction2)
                direction = projector.lift(exp_avg) / (second.sqrt_().add_(eps) * correction1)
                target.sub_(projector.restrict(direction), alpha=lr)
                if target is not param:  # Replicate -> the parameter's placements is a local slice, no communication
                    whole = DTensor.from_local(target, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
                    param.copy_(whole.redistribute(param.device_mesh, param.placements))
        return loss


def _decay_parameter_names(model: nn.Module) -> set[str]:
    # Trainer's rule: no weight decay on biases and norms
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [nn.LayerNorm], patterns))


def create_optimizer(model: nn.Module, args=None, moments: str = "weight", **overrides) -> SpectralAdamW:
    """A ``SpectralAdamW`` for every trainable parameter of ``model``, set up like Trainer's AdamW.

    ``args`` is a ``transformers.TrainingArguments`` (its learning_rate, adam_beta1/2, adam_epsilon
    and weight_decay are used) or None (AdamW's defaults); keyword ``overrides`` (lr, betas, eps,
    weight_decay) win over both. Weight decay follows Trainer's rule: none on biases and norms.
    Pass the result as ``Trainer(..., optimizers=(optimizer, None))``.
    """
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if args is not None:
        settings.update(
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
    settings.update(overrides)
    decay = _decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": settings["weight_decay"]},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return SpectralAdamW(groups, projectors=spectral_projectors(model), moments=moments, **settings)


def optimizer_state_elements(optimizer: torch.optim.Optimizer) -> int:
    """Numbers held in an optimiser's state tensors, excluding step counters."""
    return sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step")
