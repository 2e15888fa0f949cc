"""Helpers shared by the ecosystem tests and the scripts they launch (DDP, FSDP, resume, Hub).

The scripts run as real subprocesses (``accelerate launch``, ``torchrun``, a killed Trainer), so
this module is importable without pytest: the scripts put ``tests/`` on ``sys.path`` themselves.

    launching      subprocess_env, bin_of, torchrun_command, run_checked, wait_for_hang
    in-process     single_thread (the one-thread setting of the launched processes, for a run here)
    data, models   token_rows, write_shakespeare_stand_in, tiny_gpt2 (= tiny_models.make_gpt2, training mode)
    in a worker    spectral_state, mean_over_ranks, reference_step, finish_rank
    comparing      assert_recipe_runs_match (a recipe's run.json on two processes against one)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import VOCAB, make_gpt2

TESTS_DIR = Path(__file__).resolve().parent
WORKERS_DIR = TESTS_DIR / "workers"  # the scripts tests launch (torchrun workers, training runs to kill and resume)
REPO_ROOT = TESTS_DIR.parent
SEQ_LEN = 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, vocab: int = VOCAB):
    """``tiny_models.make_gpt2`` in training mode, under the name the launched scripts first used."""
    return make_gpt2(seed, dropout=dropout, vocab_size=vocab).train()


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


def torchrun_command(script: str, *args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone`` with ``nproc`` processes on one machine, for a script in tests/workers/."""
    return [bin_of("torchrun"), "--standalone", "--nproc_per_node", str(nproc), str(WORKERS_DIR / script), *args]


def wait_for_hang(job: subprocess.Popen, ready, deadline: float, step: int = 4, poll: float = 0.1) -> None:
    """Wait until ``ready()`` says the run to be killed is inside its save of ``step``; fail the test if
    the run ends first or ``deadline`` (``time.monotonic()``) passes."""
    import pytest

    while not ready():
        if job.poll() is not None:
            pytest.fail(f"the run to be killed ended by itself:\n{job.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the run never reached the save of step {step}")
        time.sleep(poll)


@contextlib.contextmanager
def single_thread():
    """torch on one thread inside the block, as in the launched processes (OMP_NUM_THREADS=1): two
    OpenMP threads on a busy 2-core machine stall each other, and the tensors here are tiny anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SHAKESPEARE_LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak.", ""]


def write_shakespeare_stand_in(root: Path) -> Path:
    """A small stand-in for tiny Shakespeare (every character the recipe's vocabulary needs), written to
    ``root/input.txt``: hermetic, no network. Returns the file's path."""
    path = Path(root) / "input.txt"
    path.write_text("\n".join(SHAKESPEARE_LINES * 120) + "\nABCDEFGHIJKLMNOPQRSTUVWXYZ!?;&'$-3.,:\n")
    return path


def mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    """The mean of a per-rank loss over all ranks (an all-reduce), as a float on every rank."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world


def reference_step(model, optimizer, ids: torch.Tensor) -> float:
    """One causal-LM step of an unsharded reference model on the whole batch; returns its loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def finish_rank(out: str, rank: int, results: dict, **dump) -> None:
    """Write a rank's results to OUT/rank{R}.json, wait for the other ranks, and leave the process group."""
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle, **dump)
    dist.barrier()
    dist.destroy_process_group()


def assert_recipe_runs_match(two: dict, one: dict) -> None:
    """A recipe's run.json from two processes against one process with the same global batch: both finished
    on their world sizes, with the same tokens per step and the same training losses."""
    assert two["finished"] and two["hardware"]["world_size"] == 2 and one["hardware"]["world_size"] == 1
    # the same tokens per step, the same losses (Trainer logs the mean over processes)
    assert [t for t, _ in two["curves"]["train"]] == [t for t, _ in one["curves"]["train"]]
    torch.testing.assert_close(torch.tensor(two["curves"]["train"]), torch.tensor(one["curves"]["train"]),
                               rtol=1e-5, atol=1e-6)
