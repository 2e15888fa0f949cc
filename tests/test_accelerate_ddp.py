"""Accelerate with two processes (DDP over gloo on the CPU) trains a spectral model like one process.

Runs tests/workers/ddp_train.py, a plain Accelerate loop, and the char-Shakespeare recipe's Trainer script,
each unchanged under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` and
as a single process with the same global batch, side by side.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch
from ecosystem_utils import REPO_ROOT, WORKERS_DIR, assert_recipe_runs_match, bin_of, single_thread, subprocess_env
from safetensors.torch import load_file
from workers import ddp_train

pytestmark = pytest.mark.slow  # accelerate launch, and Trainer runs

SCRIPT = str(WORKERS_DIR / "ddp_train.py")
SMOKE = REPO_ROOT / "recipes" / "shakespeare_char" / "configs" / "smoke.yaml"
# SGD, not Adam, for the comparison: Adam divides by sqrt(v), so a near-zero gradient entry whose sign
# differs in the last bit between an all-reduce and a one-process sum becomes a full lr-sized step, and
# the parameters would only agree to ~lr. With SGD they agree to float rounding.
TRAIN_ARGS = ["--optimizer", "sgd", "--lr", "0.5", "--steps", "4", "--global-batch", "8"]


RECIPE_ARM = "lowfreq_mn2_adamw"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("ddp")
    launch = [bin_of("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    commands = [launch + [SCRIPT, "--out", str(out / "two"), *TRAIN_ARGS]]
    recipe = importlib.util.find_spec("recipes.shakespeare_char.train") is not None
    if recipe:
        # the char-Shakespeare recipe, unchanged, two processes with 2 rows each: the smoke profile's global batch of 4
        data = request.getfixturevalue("shakespeare_data")
        commands.append(launch + ["-m", "recipes.shakespeare_char.train", str(SMOKE), "--arm", RECIPE_ARM, "--seed", "0",
                                  f"data_dir={data}", f"runs_dir={out / 'recipe_two'}", "per_device_train_batch_size=2"])
    # side by side: the launchers' workers and the single process share the machine's cores
    jobs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO_ROOT),
                             env=subprocess_env(ACCELERATE_USE_CPU="1")) for cmd in commands]
    # meanwhile, the one-process runs in this process (saving a third interpreter start)
    with single_thread():
        ddp_train.main(["--out", str(out / "one"), *TRAIN_ARGS])
        if recipe:  # 4 rows per step in one process
            from recipes.shakespeare_char import train

            settings = train.run_settings(train.load_profile(SMOKE), RECIPE_ARM, 0,
                                          [f"data_dir={data}", f"runs_dir={out / 'recipe_one'}"])
            train.train(settings)
    for cmd, job in zip(commands, jobs, strict=True):
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"{' '.join(cmd)} exited {job.returncode}:\n{output[-6000:]}"
    return out


def _losses(folder):
    return json.loads((folder / "losses.json").read_text())


def test_two_processes_really_ran_distributed(runs):
    two, one = _losses(runs / "two"), _losses(runs / "one")
    assert two["processes"] == 2 and two["distributed_type"] == "DistributedType.MULTI_CPU"
    assert one["processes"] == 1


def test_both_ranks_hold_the_same_coefficients(runs):
    rank0, rank1 = load_file(runs / "two" / "rank0.safetensors"), load_file(runs / "two" / "rank1.safetensors")
    assert any("spectral_coefficients" in name for name in rank0)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_loss_and_parameters_match_one_process_with_the_same_global_batch(runs):
    two, one = _losses(runs / "two")["losses"], _losses(runs / "one")["losses"]
    assert len(two) == len(one) == 4 and two[-1] < two[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    distributed, single = load_file(runs / "two" / "rank0.safetensors"), load_file(runs / "one" / "rank0.safetensors")
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_saved_adapter_holds_the_trained_coefficients(runs):
    saved = load_file(runs / "two" / "adapter" / "adapter_model.safetensors")
    trained = load_file(runs / "two" / "rank0.safetensors")
    coefficients = {k: v for k, v in trained.items() if k.endswith("spectral_coefficients.default")}
    assert coefficients
    for name, value in coefficients.items():
        assert torch.equal(saved[name.removesuffix(".default")], value)


def test_the_shakespeare_recipe_runs_unchanged_on_two_processes_and_matches_one(runs):
    two_path = runs / "recipe_two" / "smoke" / RECIPE_ARM / "seed0" / "run.json"
    if not two_path.exists():
        pytest.skip("recipes/shakespeare_char is not in this checkout")
    two = json.loads(two_path.read_text())
    one = json.loads((runs / "recipe_one" / "smoke" / RECIPE_ARM / "seed0" / "run.json").read_text())
    assert_recipe_runs_match(two, one)
    torch.testing.assert_close(torch.tensor(two["curves"]["val"]), torch.tensor(one["curves"]["val"]),
                               rtol=1e-5, atol=1e-6)
