"""The spectral experiments for PEFT's method_comparison/MetaMathQA benchmark: every file loads with PEFT's own
loader, builds a working model, and matches what make_experiments.py writes today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, get_peft_model
from tiny_models import make_llama

import hf_spectral
from hf_spectral import SpectralConfig
from recipes.method_comparison.peft_metamathqa import make_experiments

ROOT = Path(make_experiments.__file__).parent
FOLDERS = sorted(p.parent for p in ROOT.rglob("adapter_config.json"))
# the keys of the benchmark's TrainConfig (method_comparison/MetaMathQA/utils.py), which a training_params.json may set
TRAIN_CONFIG_KEYS = {
    "model_id", "dtype", "max_seq_length", "batch_size", "batch_size_eval", "max_steps", "eval_steps", "compile",
    "use_gc", "query_template", "seed", "grad_norm_clip", "optimizer_type", "optimizer_kwargs", "lr_scheduler",
    "use_amp", "autocast_adapter_dtype", "generation_kwargs", "attn_implementation", "init_kv_cache_prefix",
}


def test_every_experiment_is_shipped_and_up_to_date():
    expected = make_experiments.experiments()
    assert sorted(str(f.relative_to(ROOT)) for f in FOLDERS) == sorted(expected)
    for name, (config, params) in expected.items():
        saved = json.loads((ROOT / name / "adapter_config.json").read_text())
        fresh = config.to_dict()
        for data in (saved, fresh):
            data.pop("peft_version", None)
            data["target_modules"] = sorted(data["target_modules"])
        assert saved == json.loads(json.dumps(fresh)), name
        assert json.loads((ROOT / name / "training_params.json").read_text()) == params


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_each_experiment_loads_with_peft_and_builds_a_model(folder):
    # the benchmark's layout: experiments/<method>/<name>/, the method's folder named for its peft_type
    assert folder.parent.name == "spectral" and folder.parent.parent.name in ("experiments", "needs_calibration")
    config = PeftConfig.from_pretrained(str(folder))  # PEFT's own loader finds the method (registered on import)
    assert isinstance(config, SpectralConfig) and config.mode == "delta"
    params = json.loads((folder / "training_params.json").read_text())
    assert set(params) <= TRAIN_CONFIG_KEYS and params["optimizer_kwargs"]["lr"] > 0

    # a Llama with room for K = 5000 in every targeted layer (v_proj: 64 x 128)
    model = get_peft_model(make_llama(hidden_size=128, intermediate_size=192), config)
    ids = torch.randint(0, 64, (2, 12))
    if config.layout == "gradient":
        with pytest.raises(RuntimeError, match="init_gradient_layout"):
            model(input_ids=ids)
        hf_spectral.init_gradient_layout(model, [ids])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable == config.n_coefficients * 2 * 2 or config.layout in ("lowfreq", "grid")  # 2 layers x q, v (a block may hold fewer)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
