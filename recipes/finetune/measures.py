"""What a run measures besides its task score, as PEFT's method comparison does: the adapter's file size, forgetting
(the loss change on held-out general text), and, for spectral arms with ``layout: gradient``, the calibration step
that chooses their index sets before training.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from .data import load_rotten_tomatoes, shakespeare_text

# --------------------------------------------------------------------------------------------------
# the gradient layout's calibration


def needs_calibration(peft_config) -> bool:
    return getattr(peft_config, "layout", None) == "gradient"


def calibrate(model, train_set, collator, *, batches: int, batch_size: int, global_budget: bool, seed: int) -> float:
    """Choose the index sets of a ``layout: gradient`` adapter from ``batches`` training batches (seeded sample);
    returns the seconds it took (a cost of the method, reported beside its step time)."""
    import hf_spectral

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_set), generator=generator)[: batches * batch_size].tolist()
    chunks = [collator([train_set[i] for i in order[start:start + batch_size]])
              for start in range(0, len(order), batch_size)]
    started = time.perf_counter()
    hf_spectral.init_gradient_layout(model, chunks, global_budget=global_budget)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# peak memory of one run on a CPU


class PeakRSS:
    """The largest resident set size of this process while a run trains and evaluates, sampled every 20 ms.

    ``getrusage``'s ``ru_maxrss`` is the peak over the whole life of the process, so in a sweep worker that ran
    other runs before it says nothing about this one; sampling the current RSS does (on Linux, from /proc).
    Elsewhere it falls back to ``ru_maxrss``.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def current() -> Optional[int]:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current() or 0)

    def start(self) -> "PeakRSS":
        if self.current() is not None:
            self.peak = self.current()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current() or 0)
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.peak / 2**20


# --------------------------------------------------------------------------------------------------
# the adapter's file


def adapter_file_bytes(model, peft_config) -> int:
    """Bytes of what a user stores for this arm: ``adapter_model.safetensors`` as PEFT saves it, or for full
    fine-tuning every weight of the model (safetensors)."""
    with tempfile.TemporaryDirectory() as folder:
        if peft_config is None:
            from safetensors.torch import save_file

            path = Path(folder) / "model.safetensors"
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            seen, unique = set(), {}
            for name, tensor in state.items():  # tied weights once, as save_pretrained does
                key = (tensor.data_ptr(), tensor.shape)
                if key not in seen:
                    seen.add(key)
                    unique[name] = tensor
            save_file(unique, str(path))
            return path.stat().st_size
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


# --------------------------------------------------------------------------------------------------
# forgetting


def general_text(source: str) -> str:
    """General text to measure forgetting on: a text file (plain or .bz2) or URL, or Rotten Tomatoes (the local csv
    or a Hub dataset name: its test reviews, one per line, everyday English for a model adapted to another domain)."""
    path = Path(source)
    if not path.exists() and (path.suffix in (".txt", ".bz2", ".csv") or source.startswith((".", "/"))):
        raise FileNotFoundError(f"forgetting_data={source!r} does not exist; give a text file, the Rotten Tomatoes "
                                "csv, a URL or a Hub dataset name.")
    is_text = source.startswith(("http://", "https://")) or (path.exists() and ".csv" not in path.name)
    if not is_text:
        return "\n".join(load_rotten_tomatoes(source)["test"]["text"])
    return shakespeare_text(source)


def general_blocks(source: str, tokenizer, block_size: int, count: int) -> torch.Tensor:
    """``count`` consecutive token blocks from the start of the general text (the same for every run)."""
    ids = torch.tensor(tokenizer(general_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    usable = min(count, ids.numel() // block_size) * block_size
    if usable == 0:
        raise ValueError(f"forgetting_data={source!r} holds fewer than {block_size} tokens; give a longer text.")
    return ids[:usable].view(-1, block_size)


@torch.no_grad()
def mean_token_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over the blocks (every block weighs the same; they have equal length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        losses.append(float(model(input_ids=batch, labels=batch).loss) * batch.shape[0])
    model.train(was_training)
    return sum(losses) / blocks.shape[0]


def base_loss(model, blocks: torch.Tensor, has_adapter: bool) -> float:
    """The loss of the base model (adapters disabled: a non-identity init like FourierFT's must not count)."""
    if has_adapter:
        with model.disable_adapter():
            return mean_token_loss(model, blocks)
    return mean_token_loss(model, blocks)


def forgetting(before: Optional[float], after: Optional[float]) -> Optional[dict]:
    if before is None or after is None:
        return None
    return {"before": before, "after": after, "change": after - before if math.isfinite(after) else math.inf}
