"""torch.compile of a model with spectral deltas: no graph break inside a spectral layer, one graph for the whole
model (no recompilation per layer), and the same loss and gradients as eager."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig

IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def model(layout: str):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=32,
    ))
    config = SpectralConfig(n_coefficients=200, layout=layout, init_weights=False, target_modules="all-linear")
    return get_peft_model(base, config).train()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["random", "lowfreq"])
def test_compiled_training_step_has_no_graph_break_and_matches_eager(layout):
    torch._dynamo.reset()
    eager = model(layout)
    explanation = torch._dynamo.explain(lambda: eager(input_ids=IDS, labels=IDS).loss)()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1

    loss = eager(input_ids=IDS, labels=IDS).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in eager.named_parameters() if p.requires_grad}

    compiled_model = model(layout)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    compiled_loss = compiled(input_ids=IDS, labels=IDS).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, param in compiled_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
