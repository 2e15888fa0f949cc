"""Data for the mixing recipe: tiny Shakespeare (nanoGPT's split), a local file, WikiText-2 or Penn Treebank,
in characters or BPE tokens.

- default: tiny Shakespeare as the char recipe finds it (``recipes/shakespeare_char/prepare.read_text``: the shared
  copy ``../shared/data/tinyshakespeare/input.txt`` if there is one, else the copy shipped with that recipe);
- ``--input PATH``: any UTF-8 text file, split the same way;
- ``--dataset wikitext2``: the Hub dataset ``Salesforce/wikitext`` (``wikitext-2-raw-v1``) through
  ``datasets.load_dataset`` (needs internet), its own train and validation splits;
- ``--dataset ptb``: the Hub dataset ``ptb-text-only/ptb_text_only`` (Penn Treebank, one sentence a row) the same way.

Units (``tokenizer``):
- ``char`` (default): the sorted distinct characters of the text (65 for tiny Shakespeare);
- ``bpe``: a byte-level BPE of ``bpe_vocab`` tokens trained on the training split alone (``tokenizers``, offline);
- any other value: a pretrained tokenizer's name or local folder (``AutoTokenizer``), its ids renumbered to the
  ones that occur, so the embedding holds no unused rows.

Whatever the unit, ``tokens_per_word`` is the validation text's tokens per whitespace-separated word, so
``exp(loss * tokens_per_word)`` is a word-level perplexity that char and BPE models share (the papers' metric on
WikiText-2 and Penn Treebank). For tiny Shakespeare the first 90% is training text, the last 10% validation, no
shuffling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recipes.shakespeare_char.prepare import read_text

TRAIN_SHARE = 0.9


@dataclass
class TextData:
    train: np.ndarray
    val: np.ndarray
    vocab: list[str]        # what each id stands for: a character, or a token's text
    source: str
    unit: str = "char"      # char, bpe, or the pretrained tokenizer's name
    tokens_per_word: float = float("nan")  # validation tokens per whitespace-separated word
    train_text: str = field(default="", repr=False)
    val_text: str = field(default="", repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def chars(self) -> str:
        if self.unit != "char":
            raise AttributeError(f"the data is in {self.unit} tokens, not characters: read .vocab")
        return "".join(self.vocab)

    def word_perplexity(self, loss: float) -> float:
        """The word-level perplexity of a mean per-token loss (nats) on the validation text."""
        return math.exp(loss * self.tokens_per_word)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``block_size + 1`` tokens: inputs and next-token targets."""
        ids = self.train if split == "train" else self.val
        if len(ids) <= block_size + 1:
            raise ValueError(f"the {split} split has {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}: "
                             "use a smaller block_size or a longer text")
        starts = torch.randint(0, len(ids) - block_size - 1, (batch_size,), generator=generator)
        windows = torch.stack([torch.from_numpy(ids[s: s + block_size + 1].astype(np.int64)) for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


HUB_DATASETS = {
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "text", ""),
    "ptb": (("ptb-text-only/ptb_text_only",), "sentence", "\n"),
}
DATASETS = ("shakespeare", *HUB_DATASETS)


def _hub_text(dataset: str) -> tuple[str, str, str]:
    """Train and validation text of a Hub dataset, and its name (needs internet, or the datasets cache)."""
    from datasets import load_dataset  # only this path needs the Hub

    name, column, joiner = HUB_DATASETS[dataset]
    try:
        splits = load_dataset(*name)
    except Exception as error:  # no network, a moved dataset: say which one and what else works
        raise RuntimeError(
            f"dataset={dataset!r} reads the Hub dataset {'/'.join(name)}, which could not be loaded ({error}); "
            "connect to the Hub, or train on a local text with input=PATH (dataset=shakespeare)."
        ) from error
    train_text, val_text = (joiner.join(splits[split][column]) for split in ("train", "validation"))
    return train_text, val_text, "/".join(name)


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _train_bpe(text: str, vocab_size: int):
    """A byte-level BPE trained on ``text`` alone (no pretrained vocabulary: the benchmark stays offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tokenizer


def _encoder(tokenizer: str, train_text: str, bpe_vocab: int):
    """``(encode, name_of)`` of a unit: text -> ids, and id -> what it stands for."""
    if tokenizer == "char":  # ids are code points; renumbered they give the sorted distinct characters

        def encode(text: str) -> np.ndarray:
            return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)

        return encode, chr
    if tokenizer == "bpe":
        if not 256 < bpe_vocab < 65_536:
            raise ValueError(f"bpe_vocab={bpe_vocab}: give 257-65535 tokens (the 256 bytes and merges), e.g. 4096")
        trained = _train_bpe(train_text, bpe_vocab)
        return (lambda text: trained.encode(text).ids), trained.id_to_token
    from transformers import AutoTokenizer

    try:
        pretrained = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as error:
        raise ValueError(
            f"tokenizer={tokenizer!r} is neither 'char', 'bpe' nor a tokenizer that loads ({error}): give a Hub "
            "name or a local folder with tokenizer files."
        ) from error
    return (lambda text: pretrained(text, add_special_tokens=False)["input_ids"]), pretrained.convert_ids_to_tokens


def _text_data(train_text: str, val_text: str, source: str, tokenizer: str, bpe_vocab: int) -> TextData:
    encode, name_of = _encoder(tokenizer, train_text, bpe_vocab)
    train_ids, val_ids = np.asarray(encode(train_text), np.int64), np.asarray(encode(val_text), np.int64)
    used = np.union1d(train_ids, val_ids)  # renumbered 0..V-1: no embedding rows for ids that never occur
    if len(used) >= 65_536:
        raise ValueError(f"{len(used)} distinct tokens do not fit uint16 ids: use tokenizer='bpe' with a smaller bpe_vocab")
    train, val = (np.searchsorted(used, ids).astype(np.uint16) for ids in (train_ids, val_ids))
    return TextData(train, val, [name_of(int(i)) for i in used], source, tokenizer, len(val_ids) / _words(val_text),
                    train_text, val_text)


def load(input_path: str | None = None, dataset: str = "shakespeare", tokenizer: str = "char",
         bpe_vocab: int = 4096) -> TextData:
    if dataset in HUB_DATASETS:
        train_text, val_text, source = _hub_text(dataset)
    elif dataset != "shakespeare":
        raise ValueError(f"dataset={dataset!r} is not known: use one of {DATASETS} (shakespeare with input=PATH for a "
                         "local file)")
    else:
        if input_path and not Path(input_path).is_file():
            raise FileNotFoundError(
                f"{input_path} is not a file: pass --input PATH/input.txt (tiny Shakespeare, "
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)"
            )
        text, source = read_text(input_path)  # --input, else the shared copy, else the one shipped with the char recipe
        split = int(TRAIN_SHARE * len(text))
        train_text, val_text = text[:split], text[split:]
    return _text_data(train_text, val_text, source, tokenizer, bpe_vocab)
