"""Two nodes, simulated on one machine: the char-Shakespeare recipe, unchanged, as two "nodes" of one process
each, launched by torchrun and by accelerate launch (two launcher processes each, as on two shells of two
machines, talking over 127.0.0.1), against one process with the same global batch of 4 rows.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from ecosystem_utils import (
    REPO_ROOT,
    assert_recipe_runs_match,
    bin_of,
    run_checked,
    subprocess_env,
    write_shakespeare_stand_in,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SMOKE = REPO_ROOT / "recipes" / "shakespeare_char" / "configs" / "smoke.yaml"
ARM = "random_mn10_wadam"  # spectral coefficients at random positions, trained by SpectralAdamW
RECIPE = ["-m", "recipes.shakespeare_char.train", str(SMOKE), "--arm", ARM, "--seed", "0"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes_torchrun(port: int, overrides: list[str]) -> list[list[str]]:
    # what each node's shell runs; on a real cluster 127.0.0.1 becomes node 0's address
    return [[bin_of("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0", *RECIPE, *overrides] for rank in (0, 1)]


def two_nodes_accelerate(port: int, overrides: list[str]) -> list[list[str]]:
    # --num_processes counts every process of every machine
    return [[bin_of("accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
             "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no", *RECIPE, *overrides] for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    text = write_shakespeare_stand_in(root)
    env = subprocess_env(ACCELERATE_USE_CPU="1")
    run_checked([sys.executable, "-m", "recipes.shakespeare_char.prepare", "--input", str(text),
                 "--out", str(root / "data")], timeout=120, env=env, cwd=str(REPO_ROOT))
    data = f"data_dir={root / 'data'}"
    # 2 rows per process on two nodes; 4 rows in one process: the smoke profile's global batch of 4
    two = [data, "per_device_train_batch_size=2"]
    commands = {
        "torchrun node 0": None, "torchrun node 1": None, "accelerate node 0": None, "accelerate node 1": None,
        "one process": [sys.executable, *RECIPE, data, f"runs_dir={root / 'one'}"],
    }
    for name, pair in (("torchrun", two_nodes_torchrun(free_port(), [*two, f"runs_dir={root / 'torchrun'}"])),
                       ("accelerate", two_nodes_accelerate(free_port(), [*two, f"runs_dir={root / 'accelerate'}"]))):
        commands[f"{name} node 0"], commands[f"{name} node 1"] = pair
    jobs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=str(REPO_ROOT), env=env) for name, cmd in commands.items()}
    outputs = {}
    try:
        for name, job in jobs.items():
            outputs[name], _ = job.communicate(timeout=600)
            assert job.returncode == 0, f"{name}: {' '.join(commands[name])} exited {job.returncode}:\n{outputs[name][-12000:]}"
    finally:
        for job in jobs.values():  # after a failure: the launchers pass SIGTERM on to their workers
            if job.poll() is None:
                job.terminate()
                job.communicate(timeout=60)
    return root, outputs


def _run(root, name):
    folder = root / name / "smoke" / ARM / "seed0"
    return json.loads((folder / "run.json").read_text()), load_file(folder / "model" / "adapter_model.safetensors")


@pytest.mark.parametrize("launcher", ("torchrun", "accelerate"))
def test_two_nodes_train_the_recipe_to_the_coefficients_of_one_process(runs, launcher):
    root, _ = runs
    (two, two_weights), (one, one_weights) = _run(root, launcher), _run(root, "one")
    assert_recipe_runs_match(two, one)  # world sizes 2 and 1, the same tokens per step and training losses
    coefficients = [k for k in one_weights if "spectral_coefficients" in k]
    assert coefficients and two_weights.keys() == one_weights.keys()
    for name in one_weights:
        # measured: coefficients (SpectralAdamW) 3e-8 apart; the embeddings, norms and biases (AdamW) 8.7e-6, as Adam
        # turns last-bit differences of near-zero gradients into steps of up to lr (2e-3)
        tolerance = 1e-6 if name in coefficients else 2e-3
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=tolerance, msg=name)


def test_both_launchers_give_bit_identical_coefficients(runs):
    root, _ = runs
    torchrun, accelerate = _run(root, "torchrun")[1], _run(root, "accelerate")[1]
    assert torchrun.keys() == accelerate.keys()
    for name in torchrun:  # the same two-rank all-reduce, whoever launched it
        assert torch.equal(torchrun[name], accelerate[name]), name
