"""Spectral layers under FSDP2 (fully_shard) on two CPU processes over gloo, launched by torchrun.

Accelerate's FSDP plugin silently falls back to DDP on the CPU, so this drives torch's
``fully_shard`` directly (tests/workers/fsdp_worker.py) and checks that the parameters really are sharded.
"""

from __future__ import annotations

import json

import pytest
from ecosystem_utils import TESTS_DIR, run_checked, subprocess_env, torchrun_command
from safetensors import safe_open

MODES = ("delta", "replace")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_checked(torchrun_command("fsdp_worker.py", "--out", str(out)), timeout=300, env=subprocess_env())
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("mode", MODES)
def test_coefficients_are_dtensors_sharded_over_both_ranks(ranks, mode):
    _, results = ranks
    assert all(r["world_size"] == 2 for r in results)
    sharding = [r["modes"][mode]["sharding"] for r in results]
    assert sharding[0] and sharding[0].keys() == sharding[1].keys()
    for name in sharding[0]:
        zero, one = sharding[0][name], sharding[1][name]
        assert zero["dtensor"] and one["dtensor"] and zero["placements"] == ["S(0)"], name
        # each rank holds its part of the flat (K,) coefficient vector, and the parts add up to K
        assert zero["local"][0] + one["local"][0] == zero["global"][0] and zero["local"][0] < zero["global"][0]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("mode", MODES)
def test_sharded_training_matches_the_unsharded_model_on_the_whole_batch(ranks, mode):
    _, results = ranks
    for result in (r["modes"][mode] for r in results):
        # before training the sharded model computes what the unsharded one does: the rebuild runs on
        # the gathered coefficients
        assert result["logits_diff_before_training"] < 1e-6
        assert result["losses"] == pytest.approx(result["reference_losses"], rel=1e-5)
        assert result["coefficients_diff_after_training"] < 1e-5
        assert result["logits_diff_after_training"] < 1e-4


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("mode", MODES)
def test_a_sharded_safetensors_checkpoint_loads_back_to_the_same_logits(ranks, mode):
    out, results = ranks
    for result in (r["modes"][mode] for r in results):
        assert result["logits_diff_before_load"] > 1e-2  # the model it was loaded into was different
        assert result["logits_diff_after_load"] == 0.0
        # the evaluation-time weight cache was in use on both sides of the load, and the load dropped it
        assert result["layers_with_a_cached_weight_before_load"] > 0
        assert result["layers_evaluated_from_the_cache_after_load"] > 0
    files = results[0]["modes"][mode]["checkpoint_files"]
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # one per rank, no pickle
    sizes = {}
    for name in files:
        with safe_open(str(out / f"checkpoint-{mode}" / name), "pt") as handle:
            for key in handle.keys():
                if "spectral_coefficients" in key:
                    sizes.setdefault(key, []).append(handle.get_slice(key).get_shape()[0])
    expected = results[0]["modes"][mode]["sharding"]
    assert sizes.keys() == expected.keys()
    for key, parts in sizes.items():  # each file holds one rank's shard, not the whole tensor
        assert len(parts) == 2 and sum(parts) == expected[key]["global"][0] and max(parts) < sum(parts)


def test_the_shipped_distributed_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = TESTS_DIR.parent / "recipes" / "configs"
    fsdp = ClusterConfig.from_yaml_file(str(configs / "accelerate_fsdp.yaml"))
    assert str(fsdp.distributed_type) == "DistributedType.FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    deepspeed = ClusterConfig.from_yaml_file(str(configs / "accelerate_deepspeed_zero2.yaml"))
    assert (TESTS_DIR.parent / deepspeed.deepspeed_config["deepspeed_config_file"]).is_file()
    for stage in (2, 3):
        config = json.loads((configs / f"deepspeed_zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage and config["train_micro_batch_size_per_gpu"] == "auto"
