"""The paper's auxiliary objectives, as pure functions, and their weighted sum over a model's mixers.

Each mixer rebuilds its input sequence h (B, T, d) through its dictionary: the synthesis
``W_o (c_t * Re(e^{i theta} sum_s a^(t-s) u_s))`` of the atoms with the coefficients it uses (its own output).

- time domain: that rebuilt sequence against h, relative squared error over the real tokens;
- frequency domain: STFT magnitudes along positions of the rebuilt sequence against h's, padding zeroed in both;
- a Gaussian-mixture prior (diagonal, learned, scales floored) on the read coefficients c_t of that synthesis:
  negative log-likelihood per coordinate, bounded below by ``log(min_scale) + log(2 pi) / 2``.

Each mixer computes its terms in training mode when their weight is above 0 (``last_terms``);
``auxiliary_loss(model)`` adds them up with their weights, and ``replace_attention`` makes the model's
``loss`` include that sum in training mode, so ``Trainer`` and plain loops need no change.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def reconstruction_error(target: torch.Tensor, rebuilt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """sum ||h - h_hat||^2 / sum ||h||^2 over (valid) tokens; scale-free, 0 is perfect, 1 is rebuilding nothing."""
    error = (target - rebuilt).pow(2).sum(-1)
    energy = target.pow(2).sum(-1)
    if valid is not None:
        error, energy = error * valid, energy * valid
    return error.sum() / energy.sum().detach().clamp_min(1e-12)


def stft_magnitudes(signal: torch.Tensor, window: int) -> torch.Tensor:
    """|STFT| along positions of each channel of (B, T, d): shape (B * d, frequencies, frames)."""
    batch, length, channels = signal.shape
    n_fft = max(2, min(window, length))
    series = signal.transpose(1, 2).reshape(batch * channels, length)
    spectrum = torch.stft(
        series, n_fft=n_fft, hop_length=max(1, n_fft // 4), window=torch.hann_window(n_fft, device=signal.device),
        center=False, return_complex=True,
    )
    return spectrum.abs()


def stft_magnitude_error(
    target: torch.Tensor, rebuilt: torch.Tensor, window: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """sum (|S(h_hat)| - |S(h)|)^2 / sum |S(h)|^2 over time: the frequency-domain match of the rebuilt sequence.

    Padding (``valid`` 0) is zeroed in both sequences first, so what padded positions hold never counts.
    """
    if valid is not None:
        target, rebuilt = target * valid[..., None], rebuilt * valid[..., None]
    reference = stft_magnitudes(target, window)
    return (stft_magnitudes(rebuilt, window) - reference).pow(2).sum() / reference.pow(2).sum().detach().clamp_min(1e-12)


def gmm_negative_log_likelihood(
    vectors: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log sum_g pi_g N(c | mu_g, diag sigma_g^2), averaged over tokens and divided by the dimension K.

    With every scale >= s_min the density is at most (2 pi s_min^2)^(-K/2), so the result is
    >= ``gmm_lower_bound(s_min)``: a floor on the scales is what keeps the prior from collapsing onto points.
    """
    c = vectors.reshape(-1, vectors.shape[-1])[:, None, :]  # (N, 1, K)
    z = (c - means[None]) / scales[None]
    log_normal = -0.5 * z.pow(2).sum(-1) - torch.log(scales).sum(-1)[None] - 0.5 * means.shape[-1] * math.log(2 * math.pi)
    log_likelihood = torch.logsumexp(torch.log_softmax(logits, dim=0)[None] + log_normal, dim=1)
    per_coordinate = -log_likelihood / means.shape[-1]
    if valid is None:
        return per_coordinate.mean()
    weights = valid.reshape(-1)
    return (per_coordinate * weights).sum() / weights.sum().clamp_min(1.0)


def gmm_lower_bound(min_scale: float) -> float:
    """The least value ``gmm_negative_log_likelihood`` can take when every scale is >= min_scale."""
    return math.log(min_scale) + 0.5 * math.log(2 * math.pi)


_WEIGHTS = {"reconstruction": "reconstruction_weight", "stft": "stft_weight", "prior": "prior_weight"}


def mixers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "is_spectral_mixer", False)]


def auxiliary_terms(model: nn.Module) -> dict[str, float]:
    """The last forward's unweighted terms, averaged over layers (empty when none was computed)."""
    sums: dict[str, list[float]] = {}
    for mixer in mixers(model):
        for name, value in mixer.last_terms.items():
            sums.setdefault(name, []).append(float(value.detach()))
    return {name: sum(values) / len(values) for name, values in sums.items()}


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """sum over terms of weight * (the term averaged over layers), from the last forward; None if no term is on."""
    total, found = None, False
    layers = mixers(model)
    for name, weight_name in _WEIGHTS.items():
        values = [m.last_terms[name] for m in layers if name in m.last_terms]
        weight = getattr(layers[0].mixing_config, weight_name) if layers else 0.0
        if values and weight > 0:
            term = weight * torch.stack(values).mean()
            total = term if total is None else total + term
            found = True
    return total if found else None
