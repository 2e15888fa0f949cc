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
and one forward transform. Layers whose coefficient spaces share a shape (all q_proj layers, ...)
step together: both lifts of the L layers run as one batched transform over a 2L x m x n tensor,
the projection as one over L x m x n, and the rest of the step
runs as ``torch._foreach`` operations over the bunch (plain AdamW parameters too). Every layout (block and scattered) and both bases are supported.
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
each by about lr. At K = mn/2 AdamW's rates carry over; with few coefficients the step is several times
AdamW's (``benchmarks/README.md`` has the measured ratios), so start from the rate that suits AdamW on
the coefficients divided by about sqrt(mn / K) / 2.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from .transforms.coefficient_space import group_from_matrix, group_key, group_to_matrix

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
_BATCH_ELEMENTS = 1 << 24  # numbers in one batched 2L x m x n buffer of a step (64 MiB in float32)


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

    def space(self):
        """The layer's ``CoefficientSpace`` for this adapter, as it is now."""
        return self.layer.coefficient_space(self.adapter)

    def lift(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.layer.coefficient_space(self.adapter).to_matrix(coefficients)

    def restrict(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.layer.coefficient_space(self.adapter).from_matrix(matrix)


def spectral_projectors(model: nn.Module) -> dict[nn.Parameter, CoefficientProjector]:
    """A projector for every spectral coefficient tensor of ``model`` (a PeftModel or its base)."""
    from .tuner.model import spectral_layers

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
            # Parameters that step alike go together, and each bunch steps with a few batched operations instead
            # of a few per parameter: plain AdamW ones by dtype and device; spectral ones by coefficient space
            # shape (all q_proj layers, ...), through one batched lift and projection (coefficient_space.group_*).
            bunches: dict[tuple, list] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SpectralAdamW does not support sparse gradients.")
                projector = self.projectors.get(param)
                moments = group["moments"] if projector is not None else "coefficient"
                state = self.state[param]
                if not state:
                    self._init_state(param, state, projector, moments)
                state["step"] += 1
                step = float(state["step"])
                if moments == "coefficient":
                    key = ("coefficient", param.dtype, param.device, step)
                elif DTensor is not None and isinstance(param, DTensor):
                    key = ("sharded", id(param))  # FSDP2: one at a time, on the gathered tensor
                else:
                    space = projector.space()
                    key = (moments, param.dtype, param.device, step, group_key(space, space.weight_method(param.device)))
                bunches.setdefault(key, []).append((param, projector))
            for key, members in bunches.items():
                if key[0] == "coefficient":
                    self._adamw_step(group, [p for p, _ in members], key[3])
                elif key[0] == "sharded":
                    self._sharded_step(group, *members[0], group["moments"])
                else:
                    # a few 2L x m x n buffers per bunch: at most _BATCH_ELEMENTS numbers each
                    per_chunk = max(1, _BATCH_ELEMENTS // (2 * members[0][1].m * members[0][1].n))
                    for start in range(0, len(members), per_chunk):
                        self._spectral_step(group, members[start : start + per_chunk], key[0], key[3], key[4][-1])
        return loss

    def _init_state(self, param, state, projector, moments) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        if moments == "coefficient":
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            return
        # the weight-basis statistics are whole tensors, also under FSDP2 (see _sharded_step)
        local = param.to_local() if DTensor is not None and isinstance(param, DTensor) else param
        zeros = functools.partial(torch.zeros, dtype=param.dtype, device=local.device)
        state["exp_avg"] = zeros(param.shape)
        if moments == "weight":
            state["exp_avg_sq"] = zeros(projector.m, projector.n)
        else:
            state["exp_avg_sq_row"] = zeros(projector.m)
            state["exp_avg_sq_col"] = zeros(projector.n)

    def _adamw_step(self, group, params, step: float) -> None:
        """Plain AdamW on a bunch of tensors (the coefficients themselves, or parameters that are not spectral)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, 1.0 - beta2**step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / (1.0 - beta1**step))

    def _spectral_step(self, group, members, moments: str, step: float, method: str) -> None:
        """One step of several spectral coefficient tensors whose spaces share one shape: batched lifts and
        projections (an L x m x n tensor per map)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = [p for p, _ in members]
        spaces = [projector.space() for _, projector in members]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        # the gradients and the first moments lifted by one batched map (2L x m x n): one pass, not two
        lifted, lifted_avgs = group_to_matrix(spaces + spaces, grads + exp_avgs, method).split(len(params))
        if moments == "weight":
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            lifted_each = list(lifted.unbind(0))
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, lifted_each, lifted_each, value=1.0 - beta2)
            denom = torch.stack(exp_avg_sqs).div_(correction2)
        else:
            squared = lifted.square_()
            rows = [self.state[p]["exp_avg_sq_row"] for p in params]
            cols = [self.state[p]["exp_avg_sq_col"] for p in params]
            torch._foreach_lerp_(rows, list(squared.mean(dim=2).unbind(0)), 1.0 - beta2)
            torch._foreach_lerp_(cols, list(squared.mean(dim=1).unbind(0)), 1.0 - beta2)
            row, col = torch.stack(rows), torch.stack(cols)
            # rank-1 estimate of each m x n second moment: r_i c_j / mean(r) (Adafactor)
            denom = row[:, :, None] * col[:, None, :] / (row.mean(dim=1).clamp_min(1e-30)[:, None, None] * correction2)
        del lifted
        direction = lifted_avgs.div_(denom.sqrt_().add_(eps))
        torch._foreach_add_(params, group_from_matrix(spaces, direction, method), alpha=-lr / correction1)

    def _sharded_step(self, group, param, projector, moments: str) -> None:
        """FSDP2: a rank holds a shard of the K coefficients, and the weight-basis statistics need all of them:
        step the gathered tensor (the same on every rank; the state is then whole on each rank) and keep this
        rank's shard of the result."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[param]
        target, grad = param.full_tensor(), param.grad.full_tensor()
        step = float(state["step"])
        if wd != 0.0:
            target.mul_(1.0 - lr * wd)
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
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
            second = torch.outer(row, col) / (row.mean().clamp_min(1e-30) * correction2)
        direction = projector.lift(exp_avg) / (second.sqrt_().add_(eps) * correction1)
        target.sub_(projector.restrict(direction), alpha=lr)
        # Replicate -> the parameter's placements is a local slice, no communication
        whole = DTensor.from_local(target, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
        param.copy_(whole.redistribute(param.device_mesh, param.placements))


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
