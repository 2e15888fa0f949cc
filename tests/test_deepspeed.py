"""Spectral models under DeepSpeed ZeRO-2 and ZeRO-3 with the shipped configs, two CPU processes over gloo.

tests/workers/deepspeed_worker.py calls ``deepspeed.initialize`` itself under torchrun: without GPUs Accelerate's DeepSpeed
plugin is not data parallel (docs/distributed.md). Skipped where DeepSpeed is not installed
(``pip install -e ".[deepspeed]"``, which needs ``DS_BUILD_OPS=0`` and ``--no-build-isolation``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from ecosystem_utils import WORKERS_DIR, bin_of, run_checked, subprocess_env
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason='DeepSpeed is not installed: DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[deepspeed]"',
    ),
]

MODES = ("delta", "replace")
STAGES = (2, 3)


def deepspeed_env(**extra: str) -> dict:
    # the CPU accelerator; the first run builds DeepSpeed's small shared-memory op (cached afterwards)
    return subprocess_env(DS_ACCELERATOR="cpu", **extra)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run_checked([bin_of("torchrun"), "--standalone", "--nproc_per_node", "2", str(WORKERS_DIR / "deepspeed_worker.py"),
                 "--out", str(out)], timeout=900, env=deepspeed_env())
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", MODES)
def test_zero3_partitions_the_coefficients_and_zero2_keeps_them_whole(ranks, mode):
    _, results = ranks
    assert all(r["world_size"] == 2 for r in results)
    for stage in STAGES:
        parts = [r["runs"][f"zero{stage}-{mode}-sgd"]["partition"] for r in results]
        assert parts[0] and parts[0].keys() == parts[1].keys()
        for name in parts[0]:
            zero, one = parts[0][name], parts[1][name]
            if stage == 3:
                # the module holds an empty placeholder; each rank keeps its half of the flat (K,) vector
                assert zero["numel_visible"] == one["numel_visible"] == 0, name
                assert zero["local"] + one["local"] >= zero["ds_numel"] > max(zero["local"], one["local"]), name
            else:
                assert zero["numel_visible"] == zero["local"] == zero["ds_numel"] > 0, name
    optimizers = {stage: results[0]["runs"][f"zero{stage}-{mode}-sgd"]["optimizer"] for stage in STAGES}
    assert optimizers == {2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", MODES)
def test_training_matches_one_process_on_the_same_global_batch(ranks, stage, mode):
    _, results = ranks
    for run in (r["runs"][f"zero{stage}-{mode}-sgd"] for r in results):
        assert run["losses"] == pytest.approx(run["reference_losses"], rel=1e-5)
        assert run["max_change_in_training"] > 1e-3  # it trained
        # SGD: the mean of two half-batch gradients against one whole-batch gradient, float rounding apart
        assert run["max_diff_to_reference"] < 1e-6
        assert run["engine_vs_reference_logits"] < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_zero3_with_the_configs_adamw_matches_torch_adamw(ranks, mode):
    _, results = ranks
    for run in (r["runs"][f"zero3-{mode}-adamw"] for r in results):
        assert run["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        assert run["losses"] == pytest.approx(run["reference_losses"], rel=1e-5)
        # Adam divides by sqrt(v): a near-zero gradient entry whose last bits differ between an all-reduce and a
        # one-process sum moves by up to lr (1e-2) either way; everything else agrees to rounding
        assert run["max_diff_to_reference"] < 1e-2
        assert run["max_change_in_training"] > 1e-2


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", MODES)
def test_the_consolidated_adapter_loads_with_peft_to_identical_logits(ranks, stage, mode):
    out, results = ranks
    for optimizer in ("sgd", "adamw") if stage == 3 else ("sgd",):
        run = results[0]["runs"][f"zero{stage}-{mode}-{optimizer}"]
        assert "adapter_model.safetensors" in run["saved_files"] and "adapter_config.json" in run["saved_files"]
        assert run["loaded_vs_engine_logits"] == 0.0
        # whole tensors in the file, not one rank's partition (ZeRO-3) nor empty placeholders
        saved = load_file(out / f"zero{stage}-{mode}-{optimizer}" / "adapter_model.safetensors")
        partition = run["partition"]
        coefficients = {k: v for k, v in saved.items() if "spectral_coefficients" in k}
        assert len(coefficients) == len(partition)
        for name, entry in partition.items():
            assert saved[name.removesuffix(".default")].numel() == entry["ds_numel"], name
    if mode == "replace":  # replace mode also saves the trained embeddings, norms and biases
        assert any("wte" in k for k in saved) and any("ln_f" in k for k in saved)
