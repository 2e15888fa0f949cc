"""The two texts, split as the fine-tuning recipe splits them, and held-out perplexity on a fixed set of windows.

- tiny Shakespeare: ``recipes.finetune.data.shakespeare_blocks`` (train = first 90% of the characters, test = the
  last 5%), cut into consecutive windows of ``block_size`` tokens;
- Rotten Tomatoes: ``recipes.finetune.data.load_rotten_tomatoes`` (80/10/10 by movie); each split's reviews are
  joined with newlines into one text and cut the same way.

Perplexity is exp(mean next-token loss) over ``windows`` windows of the test split, evenly spaced over it, the
same windows for every model (each window is scored on its own, so a window's first token has no context).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from recipes.finetune.data import load_rotten_tomatoes, shakespeare_blocks, shakespeare_text

TEXTS = ("shakespeare", "rotten_tomatoes")


def _blocks(ids: list[int], block_size: int) -> torch.Tensor:
    ids = torch.tensor(ids, dtype=torch.long)
    usable = (ids.numel() // block_size) * block_size
    return ids[:usable].view(-1, block_size)


def text_blocks(name: str, source: str, tokenizer, block_size: int) -> dict[str, torch.Tensor]:
    """{"train", "validation", "test"} -> (blocks, block_size) token ids of one text."""
    if name == "shakespeare":
        return shakespeare_blocks(shakespeare_text(source), tokenizer, block_size)
    if name == "rotten_tomatoes":
        splits = load_rotten_tomatoes(source)
        return {
            split: _blocks(tokenizer("\n".join(splits[split]["text"]), add_special_tokens=False)["input_ids"], block_size)
            for split in ("train", "validation", "test")
        }
    raise ValueError(f"text {name!r} is not one of {TEXTS}.")


def evenly_spaced(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows spread evenly over ``blocks`` (all of them if there are fewer)."""
    if count >= blocks.shape[0]:
        return blocks
    return blocks[torch.linspace(0, blocks.shape[0] - 1, count).round().long()]


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token cross-entropy over all predicted tokens of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def held_out(model, windows: dict[str, torch.Tensor], batch_size: int = 4) -> dict[str, float]:
    """Perplexity on each text's held-out windows."""
    return {name: perplexity(model, w, batch_size) for name, w in windows.items()}


def resolve_data(path: str) -> str:
    """A data path relative to the repository root or the working directory."""
    here = Path(path)
    if here.exists() or path.startswith(("http://", "https://")):
        return path
    root = Path(__file__).resolve().parents[2] / path
    return str(root) if root.exists() else path
