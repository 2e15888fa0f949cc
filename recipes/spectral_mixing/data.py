"""Character-level data for the mixing recipe: tiny Shakespeare (nanoGPT's split), a local file, or WikiText-2.

- default: tiny Shakespeare as the char recipe finds it (``recipes/shakespeare_char/prepare.read_text``: the shared
  copy ``../shared/data/tinyshakespeare/input.txt`` if there is one, else the copy shipped with that recipe);
- ``--input PATH``: any UTF-8 text file, split the same way;
- ``--dataset wikitext2``: the Hub dataset ``Salesforce/wikitext`` (``wikitext-2-raw-v1``) through
  ``datasets.load_dataset`` (needs internet), its own train and validation splits.

Characters are the sorted distinct characters of the text (65 for tiny Shakespeare); the first 90%
is training text, the last 10% validation, no shuffling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.shakespeare_char.prepare import read_text

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
TRAIN_SHARE = 0.9


@dataclass
class CharData:
    train: np.ndarray
    val: np.ndarray
    chars: str
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``block_size + 1`` characters: inputs and next-character targets."""
        ids = self.train if split == "train" else self.val
        if len(ids) <= block_size + 1:
            raise ValueError(f"the {split} split has {len(ids)} characters, fewer than block_size + 1 = {block_size + 1}")
        starts = torch.randint(0, len(ids) - block_size - 1, (batch_size,), generator=generator)
        windows = torch.stack([torch.from_numpy(ids[s: s + block_size + 1].astype(np.int64)) for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def _encode(text: str, chars: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(chars)}
    return np.array([lookup[c] for c in text], dtype=np.uint16)


def load(input_path: str | None = None, dataset: str = "shakespeare") -> CharData:
    if dataset == "wikitext2":
        from datasets import load_dataset  # only this path needs the Hub

        splits = load_dataset(*WIKITEXT)
        train_text, val_text = ("".join(splits[s]["text"]) for s in ("train", "validation"))
        chars = "".join(sorted(set(train_text) | set(val_text)))
        return CharData(_encode(train_text, chars), _encode(val_text, chars), chars, "/".join(WIKITEXT))
    if dataset != "shakespeare":
        raise ValueError(f"dataset={dataset!r} is not known: use 'shakespeare' (the default, or --input PATH) or 'wikitext2'")
    if input_path and not Path(input_path).is_file():
        raise FileNotFoundError(
            f"{input_path} is not a file: pass --input PATH/input.txt (tiny Shakespeare, "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)"
        )
    text, source = read_text(input_path)  # --input, else the shared copy, else the one shipped with the char recipe
    chars = "".join(sorted(set(text)))
    ids = _encode(text, chars)
    split = int(TRAIN_SHARE * len(ids))
    return CharData(ids[:split], ids[split:], chars, source)
