"""Saved adapters are a promise: every adapter under tests/golden/ loads with today's code to the logits
that the version which saved it computed. A change that must break this says so in the README's changelog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = [
    (version.name, case)
    for version in sorted(p for p in GOLDEN.iterdir() if (p / "manifest.json").is_file())
    for case in json.loads((version / "manifest.json").read_text())["cases"]
]


def test_every_mode_layout_basis_and_layer_type_has_a_golden_adapter():
    seen = {(c["layer_type"], c["mode"], c["layout"], c["basis"]) for _, c in CASES}
    assert len(seen) == 2 * 2 * 5 * 2


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c['name']}" for v, c in CASES])
def test_golden_adapter_loads_to_the_saved_logits(version, case):
    root = GOLDEN / version
    base = AutoModelForCausalLM.from_pretrained(root / case["base"]).eval()
    model = PeftModel.from_pretrained(base, root / case["name"]).eval()
    expected = load_file(root / case["name"] / "expected.safetensors")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    # and merged into the base, as a plain model
    with torch.no_grad():
        merged = model.merge_and_unload()(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(merged, expected["logits"], atol=1e-5, rtol=1e-5)
