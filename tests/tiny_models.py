"""Tiny models built from configs (no downloads): the one factory per architecture the tests share.

Each ``make_*`` seeds torch, builds the model from its config and returns it in eval mode; keyword
arguments override config fields (``make_gpt2(n_layer=1, vocab_size=11)``), so a test that needs
other shapes still goes through the same factory.

    make_mlp     PEFT's own plain-torch test model (nn.Linear only, no config)
    make_gpt2    GPT-2: transformers' Conv1D layers (fan_in_fan_out) and a tied head
    make_llama   Llama: nn.Linear with grouped-query attention
    make_bert    BERT for sequence classification (its ``classifier`` is a module to save)

``MODELS`` is the table the PEFT behaviour tests cross with every mode and layout, ``DELTA_ONLY_MODELS``
the rows crossed with delta mode only (Conv2d and Embedding targets); ``example_inputs`` and ``logits_of``
feed any of them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_spectral  # noqa: F401  (registers the method)

VOCAB = 64


class MLP(nn.Module):
    """The plain-torch model of PEFT's own tests: no config, no known architecture."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 16)
        self.lin2 = nn.Linear(16, 2, bias=False)

    def forward(self, x, labels=None):
        logits = self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


class Conv2dModel(nn.Module):
    """PEFT's own Conv2d test model (``ModelConv2D`` of its tests/test_custom_models.py), in its shape."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x, labels=None):
        x = self.flat(self.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))))
        logits = self.lin0(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


def make_conv2d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Conv2dModel().eval()


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def make_gpt2(seed: int = 0, *, dropout: float = 0.0, **config) -> GPT2LMHeadModel:
    """GPT-2 with 2 layers and 32 dims (about 30k parameters); ``dropout`` sets all three dropouts."""
    torch.manual_seed(seed)
    fields = dict(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(GPT2Config(**{**fields, **config})).eval()


def make_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()


def make_bert(seed: int = 0, **config) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    fields = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(BertConfig(**{**fields, **config})).eval()


# name -> (factory, delta-mode target modules, extra config fields)
MODELS = {
    "mlp": (make_mlp, ["lin0", "lin1"], {}),
    "gpt2": (make_gpt2, ["c_attn", "c_proj", "c_fc"], {}),
    "llama": (make_llama, ["q_proj", "v_proj", "down_proj"], {}),
    "bert": (make_bert, ["query", "value", "dense"], {"modules_to_save": ["classifier"]}),
}


# name -> (factory, target modules, extra config fields): Conv2d and Embedding targets take delta mode only
DELTA_ONLY_MODELS = {
    "conv2d": (make_conv2d, ["conv2d"], {}),
    "embedding": (make_llama, ["embed_tokens", "q_proj"], {}),
}


def example_inputs(name: str, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"x": torch.randn(5, 12, generator=generator)}
    if name == "conv2d":
        return {"x": torch.randn(5, 45, generator=generator)}
    ids = torch.randint(1, VOCAB, (2, 9), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out["logits"] if isinstance(out, dict) else out.logits
