"""The Fourier dictionary over positions and the causal mixing it defines: pure functions on tensors.

Atom k is the damped complex exponential ``a_k^tau = exp(tau * (-lambda_k + i omega_k))`` over lags tau >= 0.
Mixing a sequence u (B, T, K, complex) with the dictionary is the causal convolution, per atom,

    x_t = sum_{s <= t} a^(t - s) u_s  (+ a^(t + 1) x_prev, the state carried from earlier tokens),

which is also the linear recurrence ``x_t = a x_{t-1} + u_t``. Training computes it with FFTs of length
>= 2T (O(T log T) time, O(T K) memory, no T x T object); decoding takes one recurrence step per token.
Nothing here knows about nn.Module or transformers.
"""

from __future__ import annotations

import torch


def log_step(omega: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """log a_k = -lambda_k + i omega_k with lambda_k = exp(log_decay_k) > 0 (so |a_k| < 1: every atom decays)."""
    return torch.complex(-torch.exp(log_decay.double()), omega.double())


def input_scale(log_decay: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - |a|^2): scales the input so a stationary input gives a state of the same variance (as in LRU)."""
    return torch.sqrt(-torch.expm1(-2.0 * torch.exp(log_decay.float())))


def kernel(log_a: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """a^(tau + offset) for tau = 0 .. length-1, shape (length, K), complex64.

    The exponent is formed in float64: at tau = 16,384 the phase omega * tau is ~5e4 radians, where
    float32 would be off by ~3e-3 radians and the FFT path would drift from the recurrence.
    """
    tau = torch.arange(offset, offset + length, dtype=torch.float64, device=log_a.device)
    return torch.exp(tau[:, None] * log_a[None, :]).to(torch.complex64)


def _fft_size(length: int) -> int:
    return 1 << max(1, (2 * length - 1).bit_length())


def causal_mix(u: torch.Tensor, log_a: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, K) with x_t = sum_{s<=t} a^(t-s) u_s + a^(t+1) state, by FFT convolution; u complex64."""
    if u.dim() != 3 or not u.is_complex():
        raise ValueError(f"u must be complex of shape (batch, time, atoms); got {tuple(u.shape)} {u.dtype}")
    batch, length, atoms = u.shape
    if log_a.shape != (atoms,):
        raise ValueError(f"log_a has shape {tuple(log_a.shape)}, expected ({atoms},) (one per atom)")
    if length == 1:
        x = u
    else:
        n = _fft_size(length)
        spectrum = torch.fft.fft(u, n=n, dim=1) * torch.fft.fft(kernel(log_a, length), n=n, dim=0)
        x = torch.fft.ifft(spectrum, dim=1)[:, :length]
    if state is not None:
        x = x + kernel(log_a, length, offset=1)[None] * state[:, None, :]
    return x


class _RealCausalConvolution(torch.autograd.Function):
    """r[t] = sum_{s <= t} k_re[t-s] re[s] - k_im[t-s] im[s] over the last dimension: inputs (B, K, T), kernel
    parts (K, T), by real FFTs of length n >= 2T - 1.

    Its backward is written out as real FFTs too: the gradients are the same convolutions run backwards
    (correlations, a product with the conjugate spectrum), from the spectra the forward kept. Autograd's own
    backward of ``rfft`` would run a full-length complex FFT per input.
    """

    @staticmethod
    def forward(ctx, re, im, k_re, k_im, n):
        re_spectrum, im_spectrum = torch.fft.rfft(re, n=n), torch.fft.rfft(im, n=n)
        k_re_spectrum, k_im_spectrum = torch.fft.rfft(k_re, n=n), torch.fft.rfft(k_im, n=n)
        ctx.save_for_backward(re_spectrum, im_spectrum, k_re_spectrum, k_im_spectrum)
        ctx.n = n
        return torch.fft.irfft(re_spectrum * k_re_spectrum - im_spectrum * k_im_spectrum, n=n)[..., : re.shape[-1]]

    @staticmethod
    def backward(ctx, grad):
        re_spectrum, im_spectrum, k_re_spectrum, k_im_spectrum = ctx.saved_tensors
        n, length = ctx.n, grad.shape[-1]
        # n >= 2T - 1: a lag t - s < 0 wraps to >= T, where the zero-padded factor is 0, so these are exact
        g = torch.fft.rfft(grad, n=n)
        needs = ctx.needs_input_grad
        grads = [None] * 5
        if needs[0]:  # d/d re[s] = sum_{t >= s} grad[t] k_re[t-s]
            grads[0] = torch.fft.irfft(g * k_re_spectrum.conj(), n=n)[..., :length]
        if needs[1]:
            grads[1] = torch.fft.irfft(g * k_im_spectrum.conj(), n=n)[..., :length].neg_()
        if needs[2]:  # d/d k_re[tau] = sum_{b, t} grad[b, t] re[b, t - tau]
            grads[2] = torch.fft.irfft((g * re_spectrum.conj()).sum(0), n=n)[..., :length]
        if needs[3]:
            grads[3] = torch.fft.irfft((g * im_spectrum.conj()).sum(0), n=n)[..., :length].neg_()
        return tuple(grads)


def causal_read(
    real: torch.Tensor, imag: torch.Tensor, log_a: torch.Tensor, gain: torch.Tensor,
    state: torch.Tensor | None = None, keep_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the mixer reads: r_t = Re(gain * x_t) for x = causal_mix(real + i imag, log_a, state), (B, T, K) real.

    The same numbers as taking ``causal_mix`` and then the real part, at about half the cost: gain (one complex
    number per atom) is folded into the kernel, and the real part of a convolution of a complex kernel k with a
    complex input u is ``Re(k) * real - Im(k) * imag``, two real convolutions, so the FFTs are real ones (in
    the backward as well) and nothing of size B x T x K is complex. The FFTs run over the last dimension of
    (B, K, T) views. Returns (r, x_{T-1}); x_{T-1} (B, K) complex, the decoding state, only if ``keep_state``.
    """
    batch, length, atoms = real.shape
    if log_a.shape != (atoms,) or gain.shape != (atoms,):
        raise ValueError(f"log_a {tuple(log_a.shape)} and gain {tuple(gain.shape)} must both be ({atoms},), one per atom")
    if length == 1:  # one decoding step: x = u + a state
        x = torch.complex(real, imag)
        if state is not None:
            x = x + torch.exp(log_a).to(torch.complex64) * state[:, None, :]
        return (gain * x).real, (x[:, -1] if keep_state else None)
    powers = kernel(log_a, length)  # a^tau, (T, K)
    weighted = (powers * gain).T  # (K, T)
    read = _RealCausalConvolution.apply(
        real.transpose(1, 2), imag.transpose(1, 2), weighted.real, weighted.imag, _fft_size(length)
    ).transpose(1, 2)
    last = None
    if state is not None:  # what the carried state adds: Re(gain a^(t+1) state)
        read = read + (kernel(log_a, length, offset=1) * gain)[None].mul(state[:, None, :]).real
    if keep_state:  # x_{T-1} = sum_s a^(T-1-s) u_s + a^T state
        last = (torch.complex(real, imag) * powers.flip(0)).sum(1)
        if state is not None:
            last = last + kernel(log_a, 1, offset=length)[0] * state
    return read, last


def scan(u: torch.Tensor, log_a: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
    """The same x by the sequential recurrence x_t = a x_{t-1} + u_t (the reference; O(T) steps)."""
    a = torch.exp(log_a).to(torch.complex64)
    x = torch.zeros_like(u[:, 0]) if state is None else state
    out = []
    for t in range(u.shape[1]):
        x = a * x + u[:, t]
        out.append(x)
    return torch.stack(out, dim=1)
