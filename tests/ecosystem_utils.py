"""Helpers shared by the ecosystem tests and the scripts they launch (DDP, FSDP, resume, Hub).

The scripts run as real subprocesses (``accelerate launch``, ``torchrun``, a killed Trainer), so
this module is importable without pytest: the scripts put ``tests/`` on ``sys.path`` themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
VOCAB = 64
SEQ_LEN = 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, vocab: int = VOCAB):
    """GPT-2 with 2 layers and 32 dims (about 30k parameters), built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def token_rows(rows: int, seed: int = 1, seq_len: int = SEQ_LEN, vocab: int = VOCAB) -> torch.Tensor:
    """Deterministic token ids (rows x seq_len) with some structure, so a few steps lower the loss."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(1, vocab, (rows, 1), generator=generator)
    step = torch.randint(1, 4, (rows, 1), generator=generator)
    return (start + step * torch.arange(seq_len)) % (vocab - 1) + 1


def spectral_state(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (PEFT prefix and adapter name kept), detached on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a launched script: one thread per process (2 cores shared), no network."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def bin_of(name: str) -> str:
    """A console script of the running interpreter's environment (accelerate, torchrun, hf-spectral)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_checked(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output, so a red test shows why."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result
