"""Optimiser state under sharding: SpectralAdamW under DDP, FSDP2 and DeepSpeed ZeRO, and resuming a sharded
run (FSDP2, ZeRO-3) killed mid-save, on two CPU processes over gloo launched by torchrun.

- tests/workers/sharded_optimizer_worker.py trains with ``create_optimizer`` (full and factored second moment) under
  each wrapper against one process on the whole batch;
- tests/workers/sharded_resume_worker.py checkpoints every 2 steps (each rank its shards, then a manifest), is killed
  with SIGKILL inside the save of step 4 and resumed from ``last_complete_checkpoint``.

The DeepSpeed parts are skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from ecosystem_utils import run_checked, subprocess_env, torchrun_command
from hf_spectral.ecosystem.checkpoints import verify_checkpoint
from safetensors.torch import load_file

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = 'DeepSpeed is not installed: DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[deepspeed]"'
MOMENTS = ("weight", "factored")
WRAPPERS = ("ddp", "fsdp2", "zero2", "zero3") if HAVE_DEEPSPEED else ("ddp", "fsdp2")
BACKENDS = ("fsdp2", "zero3") if HAVE_DEEPSPEED else ("fsdp2",)


def env() -> dict:
    return subprocess_env(DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_optimizer")
    run_checked(torchrun_command("sharded_optimizer_worker.py", "--out", str(out), "--wrappers", ",".join(WRAPPERS)),
                timeout=900, env=env())
    return [json.loads((out / f"rank{r}.json").read_text())["runs"] for r in (0, 1)]


def _max_diff(coefficients: dict, reference: dict) -> float:
    assert coefficients.keys() == reference.keys() and coefficients
    return max((torch.tensor(coefficients[n]) - torch.tensor(reference[n])).abs().max().item() for n in reference)


@pytest.mark.slow
@pytest.mark.parametrize("moments", MOMENTS)
@pytest.mark.parametrize("wrapper", ("ddp", "fsdp2"))
def test_spectral_adamw_under_ddp_and_fsdp2_gives_the_one_process_coefficients(optimizer_runs, wrapper, moments):
    reference = optimizer_runs[0][f"reference-{moments}"]
    for runs in optimizer_runs:
        run = runs[f"{wrapper}-{moments}"]
        assert run["error"] is None, run["error"]
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        # lr = 5e-3 over 3 steps; the two runs agree to float rounding amplified a little by Adam's division
        assert _max_diff(run["coefficients"], reference["coefficients"]) < 2e-5
    # and the comparison can tell the variants apart: full and factored statistics give other coefficients
    other = optimizer_runs[0][f"reference-{'factored' if moments == 'weight' else 'weight'}"]
    assert _max_diff(other["coefficients"], reference["coefficients"]) > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize("moments", MOMENTS)
@pytest.mark.parametrize("wrapper", ("zero2", "zero3"))
def test_spectral_adamw_under_zero_raises_before_the_first_step_naming_what_works(optimizer_runs, wrapper, moments):
    # ZeRO hands the optimiser flattened fp32 partitions in place of the coefficients; without the check the
    # weight-basis statistics were silently dropped (both variants trained as plain AdamW, 0.05 off)
    for runs in optimizer_runs:
        run = runs[f"{wrapper}-{moments}"]
        assert run["error"] is not None and run["steps_done"] == 0
        assert run["max_change"] == 0.0  # nothing moved before the error
        for named in ("DeepSpeed", "DDP", "FSDP2", '"AdamW"'):
            assert named in run["error"], run["error"]


def _flatten_like_zero(optimizer) -> list[torch.Tensor]:
    """What DeepSpeed ZeRO does to the optimiser it is handed: each group steps one flat fp32 copy of its tensors."""
    flats = []
    for group in optimizer.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).requires_grad_()
        flat.grad = torch.full_like(flat, 0.1)
        group["params"] = [flat]
        flats.append(flat)
    return flats


@pytest.mark.parametrize("moments", MOMENTS)
def test_flat_copies_in_place_of_the_coefficients_are_refused_before_anything_moves(moments):
    # in one process, so the check runs where DeepSpeed is not installed too
    from ecosystem_utils import tiny_gpt2
    from peft import get_peft_model

    from hf_spectral import SpectralConfig
    from hf_spectral.optim import create_optimizer

    model = get_peft_model(tiny_gpt2(seed=0), SpectralConfig(mode="replace", layout="random", coefficient_fraction=0.5))
    optimizer = create_optimizer(model, moments=moments, lr=1e-2, weight_decay=0.1)
    flats = _flatten_like_zero(optimizer)
    before = [f.detach().clone() for f in flats]
    with pytest.raises(RuntimeError, match=r"none of them is among the 2 tensors") as raised:
        optimizer.step()
    for named in ("DeepSpeed ZeRO", "DDP", "FSDP2", '"AdamW"', 'moments="coefficient"'):
        assert named in str(raised.value)
    assert all(torch.equal(f, b) for f, b in zip(flats, before, strict=True)) and not optimizer.state
    # plain AdamW on the coefficients has no weight-basis statistics to lose: it steps the flat copies
    coefficient = create_optimizer(model, moments="coefficient", lr=1e-2)
    flats = _flatten_like_zero(coefficient)
    before = [f.detach().clone() for f in flats]
    coefficient.step()
    assert all(not torch.equal(f, b) for f, b in zip(flats, before, strict=True))


# ---------------------------------------------------------------------------------------------- resume


def _kill_in_save(job: subprocess.Popen, out, deadline: float) -> None:
    """Wait until both ranks are inside the save of step 4, then SIGKILL them and the launcher."""
    markers = [out / f"hanging-in-save.rank{r}" for r in (0, 1)]
    while not all(m.exists() and m.read_text() for m in markers):
        if job.poll() is not None:
            pytest.fail(f"the run to be killed ended by itself:\n{job.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail("the run never reached the save of step 4")
        time.sleep(0.2)
    for marker in markers:  # torchrun starts its workers in their own sessions: kill each one
        os.kill(int(marker.read_text()), signal.SIGKILL)
    job.kill()
    job.communicate(timeout=60)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_resume")
    jobs = {}
    for backend in BACKENDS:  # side by side
        out = root / f"{backend}-killed"
        jobs[backend, "killed"] = subprocess.Popen(
            torchrun_command("sharded_resume_worker.py", "--backend", backend, "--out", str(out), "--hang-in-save-at", "4"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    try:
        deadline = time.monotonic() + 600
        left = {}
        for backend in BACKENDS:
            out = root / f"{backend}-killed"
            _kill_in_save(jobs[backend, "killed"], out, deadline)
            left[backend] = {"files": sorted(os.listdir(out / "checkpoint-4")),
                             "checkpoint_4": verify_checkpoint(str(out / "checkpoint-4")),
                             "checkpoint_2": verify_checkpoint(str(out / "checkpoint-2"))}
        for backend in BACKENDS:
            # the resumed run, then (in the same processes) the uninterrupted one to compare with
            jobs[backend, "resumed"] = subprocess.Popen(
                torchrun_command("sharded_resume_worker.py", "--backend", backend, "--out", str(root / f"{backend}-killed"),
                         "--resume", "--then-uninterrupted", str(root / f"{backend}-straight")),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        for (backend, kind), job in jobs.items():
            if kind != "killed":
                output, _ = job.communicate(timeout=600)
                assert job.returncode == 0, f"{backend} {kind} exited {job.returncode}:\n{output[-6000:]}"
    finally:
        for job in jobs.values():  # after a failed check: torchrun passes SIGTERM on to its workers
            if job.poll() is None:
                job.terminate()
                try:
                    job.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    job.kill()
    return root, left


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("fsdp2", "zero3"))
def test_a_sharded_run_killed_mid_save_resumes_to_the_uninterrupted_coefficients(resumed, backend):
    if backend not in BACKENDS:
        pytest.skip(NO_DEEPSPEED)
    root, left = resumed
    # the kill left checkpoint-4 with the model's shards and without the optimiser's or the manifest
    assert left[backend]["checkpoint_4"] is not None and left[backend]["checkpoint_2"] is None
    assert "checkpoint_complete.json" not in left[backend]["files"]
    killed, straight = root / f"{backend}-killed", root / f"{backend}-straight"
    summary = json.loads((killed / "final.json").read_text())
    assert summary["resumed_from"] == str(killed / "checkpoint-2") and summary["world_size"] == 2
    assert (killed / "incomplete-checkpoint-4").is_dir() and verify_checkpoint(str(killed / "checkpoint-4")) is None
    resumed_state, straight_state = load_file(killed / "final.safetensors"), load_file(straight / "final.safetensors")
    assert any("spectral_coefficients" in n for n in straight_state) and resumed_state.keys() == straight_state.keys()
    for name in straight_state:  # the optimiser's shards came back too: bit for bit
        assert torch.equal(resumed_state[name], straight_state[name]), name
    straight_losses = json.loads((straight / "final.json").read_text())["losses"]
    assert len(straight_losses) == 6 and summary["losses"] == straight_losses
