"""A few steps of the HF Trainer on a tiny GPT-2 lower the training loss in both modes."""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from tiny_models import VOCAB, make_gpt2
from transformers import Trainer, TrainingArguments

from hf_spectral import SpectralConfig

pytestmark = pytest.mark.slow  # runs the Trainer


def _dataset() -> Dataset:
    # a learnable pattern: each sequence counts up from a random start
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (64,), generator=generator)
    rows = [((start + torch.arange(16)) % VOCAB).tolist() for start in starts]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


@pytest.mark.parametrize(
    "config,lr,min_drop",
    [
        # a delta on a random (untrained) base learns slowly; replace mode trains the whole model
        (SpectralConfig(mode="delta", n_coefficients=200, target_modules=["c_attn", "c_fc"]), 1e-2, 0.1),
        (SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="lowfreq"), 3e-3, 0.4),
        (SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="random"), 3e-3, 0.4),
    ],
    ids=["delta", "replace-lowfreq", "replace-random"],
)
def test_trainer_lowers_the_loss(config, lr, min_drop, tmp_path):
    model = get_peft_model(make_gpt2(), config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=lr,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - min_drop and losses[-1] == min(losses), losses
