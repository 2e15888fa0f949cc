"""One spectral token mixer: a learned Fourier dictionary over positions and per-token mixing coefficients.

For the hidden states h_t (d) of one layer:

    u_t = (W_u h_t) * sqrt(1 - |a|^2)                  K complex write coefficients (what token t puts into each atom)
    x_t = sum_{s <= t} a^(t-s) u_s                      the dictionary's causal mix (atoms a_k^tau over lags tau)
    r_t = Re(exp(i theta) * x_t)                        each atom read at its phase theta_k
    y_t = W_o (gate(W_c h_t) * r_t)                     K per-token read (mixing) coefficients, then back to d

with a_k = exp(-lambda_k + i omega_k) learned (frequency omega_k, decay lambda_k, phase theta_k). The
output at t depends on positions <= t only; training uses FFT convolutions (O(T log T) time, O(T K)
memory), decoding one step of x_t = a x_{t-1} + u_t per token. The module takes and returns what the
attention it replaces does (``(output, None)``), so GPT-2 and Llama decoder layers run unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import atoms, losses
from .cache import state_slot
from .config import SpectralMixingConfig

_GATES = {"silu": F.silu, "sigmoid": torch.sigmoid, "identity": lambda t: t}


class SpectralMixer(nn.Module):
    """Causal token mixing by a dictionary of ``n_atoms`` damped complex exponentials (see the module docstring)."""

    is_spectral_mixer = True

    # float32 whatever the model's dtype (see _apply): one bf16 step cannot move a frequency of ~1 by lr * 1e-3
    FLOAT32_PARAMETERS = ("omega", "log_decay", "phase", "prior_means", "prior_log_scales", "prior_logits")

    def __init__(self, hidden_size: int, n_atoms: int, config: SpectralMixingConfig, layer_idx: int, bias: bool,
                 mix_dropout: float = 0.0, output_dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.n_atoms, self.layer_idx = hidden_size, n_atoms, layer_idx
        self.mixing_config = config
        self.in_proj = nn.Linear(hidden_size, 2 * n_atoms, bias=bias)
        self.coef_proj = nn.Linear(hidden_size, n_atoms, bias=bias)
        self.out_proj = nn.Linear(n_atoms, hidden_size, bias=bias)
        # the replaced attention's rates: on the read mix (as on attention weights) and on the output
        self.mix_dropout = nn.Dropout(mix_dropout)
        self.output_dropout = nn.Dropout(output_dropout)
        fp32 = torch.float32
        self.omega = nn.Parameter(torch.empty(n_atoms, dtype=fp32))
        self.log_decay = nn.Parameter(torch.empty(n_atoms, dtype=fp32))
        self.phase = nn.Parameter(torch.empty(n_atoms, dtype=fp32))
        if config.prior_weight > 0:
            groups = config.prior_components
            self.prior_means = nn.Parameter(torch.empty(groups, n_atoms, dtype=fp32))
            self.prior_log_scales = nn.Parameter(torch.zeros(groups, n_atoms, dtype=fp32))
            self.prior_logits = nn.Parameter(torch.zeros(groups, dtype=fp32))
        self.record_terms = False  # compute the auxiliary terms even at weight 0 (for diagnostics)
        self.last_terms: dict[str, torch.Tensor] = {}
        self.reset_dictionary()

    @torch.no_grad()
    def reset_dictionary(self) -> None:
        """Frequencies uniform in [0, max_frequency]; half-lives log-uniform in [min, max]; phases 0."""
        cfg = self.mixing_config
        self.omega.uniform_(0.0, cfg.max_frequency)
        log_half_life = torch.empty_like(self.log_decay).uniform_(math.log(cfg.min_half_life), math.log(cfg.max_half_life))
        self.log_decay.copy_(math.log(math.log(2.0)) - log_half_life)  # lambda = ln 2 / half-life
        self.phase.zero_()
        if hasattr(self, "prior_means"):
            self.prior_means.normal_(0.0, 1.0)

    @torch.no_grad()
    def reset_projections(self, std: float, out_std: float) -> None:
        """Normal init like the model's own linears (GPT-2: 0.02, output scaled by 1/sqrt(2 n_layer))."""
        for linear, scale in ((self.in_proj, std), (self.coef_proj, std), (self.out_proj, out_std)):
            linear.weight.normal_(0.0, scale)
            if linear.bias is not None:
                linear.bias.zero_()

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` move the dictionary but keep it float32 (never rounded)."""
        keep = {id(p) for name, p in self._parameters.items() if name in self.FLOAT32_PARAMETERS and p is not None}
        keep |= {id(p.grad) for name, p in self._parameters.items()
                 if name in self.FLOAT32_PARAMETERS and p is not None and p.grad is not None}

        def apply(tensor):
            if id(tensor) not in keep:
                return fn(tensor)
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # where and as what fn puts it
            return fn(tensor) if probe.dtype == tensor.dtype else tensor.to(device=probe.device)

        return super()._apply(apply, recurse)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, n_atoms={self.n_atoms}, layer_idx={self.layer_idx}"

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, cache=None, use_cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        valid = _valid_tokens(attention_mask, batch, length)
        written = self.in_proj(hidden_states)
        pre_coefficients = self.coef_proj(hidden_states)
        slot = state_slot(cache, self.layer_idx) if cache is not None else None
        # The dictionary's mix runs in float32 (complex64) with autocast off: torch's FFTs do not run in
        # half precision on CPU, and the recurrence sums thousands of terms.
        with torch.autocast(hidden_states.device.type, enabled=False):
            log_a = atoms.log_step(self.omega, self.log_decay)
            k = self.n_atoms
            real, imag = written[..., :k].float(), written[..., k:].float()
            if valid is not None:
                real, imag = real * valid[..., None], imag * valid[..., None]
            state = slot.state if slot is not None else None
            if state is not None and state.shape[0] != batch:
                raise ValueError(
                    f"the cached mixer state has batch {state.shape[0]}, the input batch {batch}: reorder or reset the cache"
                )
            # u = (real + i imag) * scale and r = Re(e^{i phase} x): both per-atom factors join one gain, which
            # causal_read folds into its kernel; the cached state is x of the scaled u, as the recurrence defines it
            scale = atoms.input_scale(self.log_decay)
            gain = scale * torch.polar(torch.ones_like(self.phase.float()), self.phase.float())
            read, last = atoms.causal_read(
                real, imag, log_a, gain, None if state is None else state / scale, keep_state=slot is not None
            )
            coefficients = _GATES[self.mixing_config.gate](pre_coefficients.float())
            synthesis = self.out_proj(self.mix_dropout(coefficients * read).to(hidden_states.dtype))
            output = self.output_dropout(synthesis)
        if slot is not None:
            slot.store(last * scale, length)
        self._auxiliary_terms(hidden_states, synthesis, coefficients, valid)
        return output, None

    def _auxiliary_terms(self, hidden_states, synthesis, coefficients, valid) -> None:
        """The paper's terms on what the mixer computed: its input sequence h, rebuilt as the synthesis
        ``W_o (c_t * Re(e^{i theta} sum_s a^(t-s) u_s))`` through the atoms and the coefficients it uses, and the
        gated read coefficients c_t (the mixing vectors of that synthesis) under the Gaussian-mixture prior."""
        cfg = self.mixing_config
        self.last_terms = {}
        if not (self.training or self.record_terms):
            return
        target, rebuilt = hidden_states.float(), synthesis.float()
        if cfg.reconstruction_weight > 0 or self.record_terms:
            self.last_terms["reconstruction"] = losses.reconstruction_error(target, rebuilt, valid)
        if cfg.stft_weight > 0 or self.record_terms:
            self.last_terms["stft"] = losses.stft_magnitude_error(target, rebuilt, cfg.stft_window, valid)
        if hasattr(self, "prior_means"):
            self.last_terms["prior"] = losses.gmm_negative_log_likelihood(
                coefficients, self.prior_means, self.prior_scales(), self.prior_logits, valid
            )

    def prior_scales(self) -> torch.Tensor:
        """The mixture's standard deviations: ``prior_min_scale + exp(prior_log_scales)``, never below the floor."""
        return self.mixing_config.prior_min_scale + torch.exp(self.prior_log_scales)


def _valid_tokens(attention_mask, batch: int, length: int) -> torch.Tensor | None:
    """Which of the ``length`` new tokens are real (not padding), from the mask the model passes; None if all are."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask of type {type(attention_mask).__name__} is not supported by the spectral mixer: load the "
            "model with attn_implementation='sdpa' or 'eager' (the mask is only read for padding)"
        )
    if attention_mask.dim() == 4:
        # the last query row sees every earlier key that is not padding
        row = attention_mask[:, 0, -1, -length:]
        keep = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif attention_mask.dim() == 2:
        keep = attention_mask[:, -length:].bool()
    else:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: expected 2-D (batch, keys) or 4-D")
    if keep.shape[0] != batch:
        keep = keep.expand(batch, -1)
    if bool(keep.all()):
        return None
    return keep.float()
