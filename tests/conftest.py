"""Test-wide settings: the spectral method is registered, and known noisy warnings are quiet."""

import warnings

import pytest

import hf_spectral  # noqa: F401  (registers the method)


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
        yield
