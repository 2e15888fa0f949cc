"""The paper's auxiliary objectives on a spectral mixer: the reconstruction goes through the atoms and the
coefficients the mixer uses, the STFT term respects the padding mask, the Gaussian-mixture prior is bounded."""

import math

import pytest
import torch
from tiny_models import VOCAB, make_gpt2

from hf_spectral.mixing import SpectralMixer, SpectralMixingConfig, replace_attention
from hf_spectral.mixing.losses import (
    gmm_lower_bound,
    gmm_negative_log_likelihood,
    reconstruction_error,
    stft_magnitude_error,
)

D = 8


def identity_mixer(half_life_tokens: float, **settings) -> SpectralMixer:
    """K = d atoms that write h_t into their real parts, read with coefficients 1 and map straight back."""
    config = SpectralMixingConfig(gate="identity", stft_window=8, **settings)
    mixer = SpectralMixer(D, D, config, layer_idx=0, bias=True)
    with torch.no_grad():
        for linear in (mixer.in_proj, mixer.coef_proj, mixer.out_proj):
            linear.weight.zero_()
            linear.bias.zero_()
        mixer.in_proj.weight[:D].copy_(torch.eye(D))
        mixer.coef_proj.bias.fill_(1.0)
        mixer.out_proj.weight.copy_(torch.eye(D))
        mixer.omega.zero_()
        mixer.phase.zero_()
        mixer.log_decay.fill_(math.log(math.log(2.0) / half_life_tokens))
    mixer.record_terms = True
    return mixer.eval()


def sequence(batch=2, length=24, seed=0):
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def test_reconstruction_is_exact_when_the_atoms_rebuild_the_sequence_and_goes_through_them():
    h = sequence()
    sharp = identity_mixer(half_life_tokens=0.01)  # a ~ 0: each atom holds only the current token
    sharp(h)
    assert float(sharp.last_terms["reconstruction"]) < 1e-10
    assert float(sharp.last_terms["stft"]) < 1e-10
    blurred = identity_mixer(half_life_tokens=20.0)  # long memories: the synthesis mixes in earlier tokens
    with torch.no_grad():  # at omega = phase = 0 a real input's read has no first-order dependence on omega
        blurred.omega.fill_(0.2)
    blurred(h)
    assert float(blurred.last_terms["reconstruction"]) > 0.1
    blurred.last_terms["reconstruction"].backward()  # the term depends on the dictionary itself
    for name in ("log_decay", "omega", "phase"):
        assert getattr(blurred, name).grad.abs().sum() > 0, name


def test_padding_never_counts_in_the_reconstruction_or_the_stft_term():
    h = sequence()
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :5] = 0  # left padding in the first row
    changed = h.clone()
    changed[0, :5] = 100.0 * torch.randn(5, D)
    mixer = identity_mixer(half_life_tokens=3.0)
    terms = []
    for x in (h, changed):
        mixer(x, attention_mask=mask)
        terms.append({k: float(v) for k, v in mixer.last_terms.items()})
    assert terms[0] == pytest.approx(terms[1], rel=1e-6)
    mixer(changed)  # without the mask, what the padding holds dominates
    assert float(mixer.last_terms["stft"]) != pytest.approx(terms[0]["stft"], rel=1e-3)


def test_term_functions_are_zero_on_a_perfect_rebuild_and_scale_free():
    h = sequence()
    assert float(reconstruction_error(h, h)) == 0.0 and float(stft_magnitude_error(h, h, 8)) == 0.0
    assert float(reconstruction_error(h, torch.zeros_like(h))) == pytest.approx(1.0)
    assert float(stft_magnitude_error(3 * h, 1.5 * h, 8)) == pytest.approx(0.25, rel=1e-5)


def test_the_prior_is_bounded_below_and_reaches_the_bound_only_on_a_point_at_the_floor():
    floor = 0.05
    means = torch.randn(3, D)
    at_floor = torch.full((3, D), floor)
    on_a_mean = means[1].expand(10, D)
    value = gmm_negative_log_likelihood(on_a_mean, means, at_floor, torch.tensor([-50.0, 50.0, -50.0]))
    assert float(value) == pytest.approx(gmm_lower_bound(floor), abs=1e-4)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        vectors, scales = torch.randn(20, D, generator=g), floor + torch.rand(3, D, generator=g)
        assert float(gmm_negative_log_likelihood(vectors, means, scales, torch.randn(3, generator=g))) >= gmm_lower_bound(floor)


def test_scales_cannot_collapse_below_the_floor_when_the_prior_is_minimised():
    floor = 0.05
    model = replace_attention(make_gpt2(), SpectralMixingConfig(prior_weight=1.0, prior_min_scale=floor))
    mixers = [m for m in model.modules() if isinstance(m, SpectralMixer)]
    for m in mixers:
        m.record_terms = True
    prior_parameters = [p for m in mixers for p in (m.prior_means, m.prior_log_scales, m.prior_logits)]
    optimizer = torch.optim.Adam(prior_parameters + [p for m in mixers for p in m.coef_proj.parameters()], lr=0.1)
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    values = []
    for _ in range(150):  # the prior alone, as hard as it can: pull every vector onto a mean, shrink the scales
        model(input_ids=x)
        loss = sum(m.last_terms["prior"] for m in mixers) / len(mixers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(float(loss))
    smallest = min(float(m.prior_scales().min()) for m in mixers)
    assert floor <= smallest < 1.5 * floor  # it pushed the scales down to the floor, not below
    assert min(values) >= gmm_lower_bound(floor) - 1e-5
    assert values[-1] < values[0] - 1.0  # and it did minimise


def test_the_prior_acts_on_the_coefficients_the_reconstruction_uses():
    model = replace_attention(make_gpt2(), SpectralMixingConfig(prior_weight=1.0))
    mixer = next(m for m in model.modules() if isinstance(m, SpectralMixer))
    mixer.record_terms = True
    model(input_ids=torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)))
    mixer.last_terms["prior"].backward()
    assert mixer.coef_proj.weight.grad.abs().sum() > 0  # c_t = gate(W_c h_t): the read coefficients
    assert mixer.in_proj.weight.grad is None  # not the write side


def test_a_floor_is_required():
    with pytest.raises(ValueError, match="prior_min_scale=0"):
        SpectralMixingConfig(prior_min_scale=0)
