"""The generative task (``task: gen``): Rotten Tomatoes as text to complete, scored by exact match.

A causal LM reads ``Review: <text>\\nSentiment:`` and must write `` fresh`` or `` rotten``. Training puts the loss
on the answer tokens only; the score is the share of held-out reviews whose greedy continuation's first word is
the right one (so a model that rambles or answers in other words scores zero on that review). The validation loss
(answer tokens only) breaks ties when learning rates are chosen.
"""

from __future__ import annotations

from typing import Optional

import torch

from .data import load_rotten_tomatoes

PROMPT = "Review: {text}\nSentiment:"
ANSWERS = (" rotten", " fresh")  # label 0, label 1


class PromptAnswers(torch.utils.data.Dataset):
    """Tokenized prompt + answer pairs; ``labels`` are -100 on the prompt, so only the answer is learned."""

    def __init__(self, prompts: list[list[int]], answers: list[list[int]], labels: list[int]):
        self.prompts, self.answers, self.labels = prompts, answers, labels

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        ids = self.prompts[i] + self.answers[i]
        return {"input_ids": ids, "labels": [-100] * len(self.prompts[i]) + self.answers[i]}


def gen_data(path: str, tokenizer, max_length: int, max_train: Optional[int], evenly) -> dict[str, PromptAnswers]:
    """Train/validation/test splits of the task; ``evenly(n_total)`` gives the held-out rows to keep."""
    data = load_rotten_tomatoes(path)
    if max_train is not None:
        data["train"] = data["train"].shuffle(seed=0).select(range(min(max_train, len(data["train"]))))
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in ANSWERS]
    splits = {}
    for split in ("train", "validation", "test"):
        rows = data[split] if split == "train" else data[split].select(evenly(len(data[split])))
        prompts, answers, labels = [], [], []
        for text, label in zip(rows["text"], rows["label"], strict=True):
            # cut the review, not the question, so every prompt ends the same way
            review = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            prompt = PROMPT.format(text=tokenizer.decode(review))
            prompts.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            answers.append(answer_ids[int(label)])
            labels.append(int(label))
        splits[split] = PromptAnswers(prompts, answers, labels)
    return splits


class PadCollator:
    """Right-pads input_ids (pad token), labels (-100) and the attention mask to the longest in the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""


@torch.no_grad()
def exact_match(model, tokenizer, dataset: PromptAnswers, batch_size: int, max_new_tokens: int = 3) -> float:
    """Share of prompts whose greedy continuation starts with the right answer word."""
    model.eval()
    device = next(model.parameters()).device
    words = [first_word(a) for a in ANSWERS]
    hits = 0
    for start in range(0, len(dataset), batch_size):
        prompts = dataset.prompts[start:start + batch_size]
        width = max(len(p) for p in prompts)
        # left padding, so every prompt ends where generation starts
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row, continuation in enumerate(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
            hits += first_word(continuation) == words[dataset.labels[start + row]]
    return hits / max(len(dataset), 1)
