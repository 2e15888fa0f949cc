"""Kill a Trainer run with SIGKILL in the middle of a checkpoint save; resume; compare with an
uninterrupted run with the same seed (tests/workers/resume_train.py: tiny replace-mode GPT-2 with dropout,
6 steps across an epoch boundary, a checkpoint every 2 steps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ecosystem_utils import WORKERS_DIR, run_checked, single_thread, subprocess_env, wait_for_hang
from hf_spectral.ecosystem.checkpoints import MANIFEST_NAME, last_complete_checkpoint, verify_checkpoint
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint
from workers import resume_train

SCRIPT = str(WORKERS_DIR / "resume_train.py")

pytestmark = pytest.mark.slow  # Trainer runs, two of them in subprocesses


def _start(out, *extra):
    return subprocess.Popen([sys.executable, SCRIPT, "--out", str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    killed_dir, straight_dir = root / "killed", root / "straight"
    killed = _start(killed_dir, "--hang-in-save-at", "4")
    # meanwhile the uninterrupted run, in this process with one thread like the subprocesses
    with single_thread():
        resume_train.main(["--out", str(straight_dir)])
    marker = killed_dir / resume_train.HANGING_MARKER
    wait_for_hang(killed, marker.exists, deadline=time.monotonic() + 240, step=4)
    os.kill(killed.pid, signal.SIGKILL)  # a real kill, in the middle of writing checkpoint-4
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL

    # what the kill left behind, before anything repairs it
    left = {
        "trainer_would_resume_from": get_last_checkpoint(str(killed_dir)),
        "checkpoint_4_files": sorted(os.listdir(killed_dir / "checkpoint-4")),
        "checkpoint_4_problem": verify_checkpoint(str(killed_dir / "checkpoint-4")),
        "checkpoint_2_problem": verify_checkpoint(str(killed_dir / "checkpoint-2")),
    }
    run_checked([sys.executable, SCRIPT, "--out", str(killed_dir), "--resume"], timeout=240, env=subprocess_env())
    return killed_dir, straight_dir, left


def test_the_kill_left_a_broken_checkpoint_that_trainer_would_resume_from(runs):
    killed_dir, _, left = runs
    assert left["trainer_would_resume_from"] == str(killed_dir / "checkpoint-4")  # the trap
    assert "adapter_model.safetensors" in left["checkpoint_4_files"]  # weights written ...
    assert "trainer_state.json" not in left["checkpoint_4_files"]  # ... the rest not
    assert MANIFEST_NAME not in left["checkpoint_4_files"] and left["checkpoint_4_problem"]
    assert left["checkpoint_2_problem"] is None


def test_resume_skips_the_broken_checkpoint_and_sets_it_aside(runs):
    killed_dir, _, _ = runs
    summary = json.loads((killed_dir / "final.json").read_text())
    assert summary["resumed_from"] == str(killed_dir / "checkpoint-2") and summary["global_step"] == 6
    assert (killed_dir / "incomplete-checkpoint-4").is_dir()
    for step in (2, 4, 6):  # the resumed run wrote checkpoint-4 again, completely
        assert verify_checkpoint(str(killed_dir / f"checkpoint-{step}")) is None
    assert last_complete_checkpoint(str(killed_dir)) == str(killed_dir / "checkpoint-6")


def test_the_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one(runs):
    killed_dir, straight_dir, _ = runs
    resumed, straight = load_file(killed_dir / "final.safetensors"), load_file(straight_dir / "final.safetensors")
    assert any("spectral_coefficients" in name for name in straight) and resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # and the logged losses are the same numbers (steps 1-2 come back with the checkpoint's trainer state)
    resumed_losses = json.loads((killed_dir / "final.json").read_text())["losses"]
    straight_losses = json.loads((straight_dir / "final.json").read_text())["losses"]
    assert len(straight_losses) == 6 and resumed_losses == straight_losses


def test_checkpoints_hold_safetensors_weights_and_a_damaged_file_is_caught(runs, tmp_path):
    _, straight_dir, _ = runs
    checkpoint = straight_dir / "checkpoint-6"
    files = os.listdir(checkpoint)
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") and "model" in f for f in files)
    damaged = tmp_path / "checkpoint-8"
    damaged.mkdir()
    for name in files:
        (damaged / name).write_bytes((checkpoint / name).read_bytes())
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    assert "adapter_model.safetensors has" in verify_checkpoint(str(damaged))
    same_size = bytearray((checkpoint / "adapter_model.safetensors").read_bytes())
    same_size[-1] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(same_size))
    assert "SHA-256" in verify_checkpoint(str(damaged))
    os.rename(weights, damaged / "adapter_model.bin")
    assert "pickles" in verify_checkpoint(str(damaged)) or "missing" in verify_checkpoint(str(damaged))
