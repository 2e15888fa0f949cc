"""TRL: ``SFTTrainer(model, ..., peft_config=SpectralConfig(...))`` trains a tiny causal LM and saves
an adapter that loads back. Run with TRL's own defaults, which on this CPU mean bf16 autocast and
gradient checkpointing: the spectral transform has to stay in float32 inside a bf16 forward
(torch's CPU FFT rejects bf16) and the coefficients must still get gradients through checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import make_gpt2

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # runs SFTTrainer

from hf_spectral import SpectralConfig, SpectralLayer  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog.", "a stitch in time saves nine.",
         "all that glitters is not gold.", "to be or not to be, that is the question."] * 4


def char_tokenizer():
    """A character-level fast tokenizer built in memory (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_trains_spectral_coefficients_with_its_defaults_and_saves_a_loadable_adapter(tmp_path):
    from datasets import Dataset

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        max_length=32, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, kept on purpose
    config = SpectralConfig(mode="delta", n_coefficients=50, layout="random", target_modules=["c_attn", "c_fc"])
    trainer = trl.SFTTrainer(
        model=make_gpt2(seed=0), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer(), peft_config=config,
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "SPECTRAL"

    layers = [m for m in model.modules() if isinstance(m, SpectralLayer)]
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append((o.dtype, torch.is_grad_enabled())))
             for layer in layers]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("spectral_coefficients" in n for n in before)
    trainer.train()
    for hook in hooks:
        hook.remove()

    assert model.base_model.model.is_gradient_checkpointing  # switched on by train()
    assert (torch.bfloat16, True) in seen  # the layers ran inside TRL's bf16 autocast, with gradients
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert after[name].dtype == torch.float32  # master coefficients stay float32
        assert not torch.equal(after[name].detach(), value), f"{name} did not train"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(make_gpt2(seed=0), str(tmp_path / "adapter")).eval()
    for name, value in dict(loaded.named_parameters()).items():
        if "spectral_coefficients" in name:
            assert torch.equal(value, after[name])
    # Accelerate wrapped the model's forward in bf16 autocast for training; compare in float32
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    ids = torch.tensor([[5, 9, 3, 17, 22, 8, 4, 30]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
