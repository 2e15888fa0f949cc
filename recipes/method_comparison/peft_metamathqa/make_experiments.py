"""Write the spectral experiments for PEFT's own benchmark, ``method_comparison/MetaMathQA`` in huggingface/peft.

    python -m recipes.method_comparison.peft_metamathqa.make_experiments

Each experiment is a folder ``<method>/<name>/`` holding ``adapter_config.json`` (written by
``SpectralConfig.save_pretrained``, so it always has this version's fields) and ``training_params.json`` (only what
differs from the benchmark's ``default_training_params.json``: the learning rate). The adapters target q_proj and
v_proj, as the benchmark's FourierFT experiments do, so K = 1000 and 5000 give the parameter counts of its FourierFT
rows (56k and 280k on Llama-3.2-3B's 28 layers).

``experiments/`` runs in the benchmark unchanged. ``needs_calibration/`` holds the ``gradient`` layout, whose index
sets are chosen by ``hf_spectral.init_gradient_layout`` after ``get_peft_model``: the benchmark's ``run.py`` has no
step for that, so these run only with the few lines the README gives added to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_spectral import SpectralConfig

HERE = Path(__file__).parent
TARGETS = ["q_proj", "v_proj"]
# Learning rates from the classification sweep (recipes/finetune/results/cls_gpu_h100): spectral random's best rate
# was 1e-3 at K = 1000 and 3e-4 at K = 5000 (scaling 10). A starting point for MetaMathQA, not a measured best there.
LEARNING_RATES = {1000: 1e-3, 5000: 3e-4}
LAYOUTS = ("sparse_grid", "random", "grid", "lowfreq", "banded", "gradient")


def experiments() -> dict[str, tuple[SpectralConfig, dict]]:
    """{relative folder: (adapter config, training params)}."""
    out = {}
    for layout in LAYOUTS:
        for k, lr in LEARNING_RATES.items():
            config = SpectralConfig(mode="delta", layout=layout, n_coefficients=k, target_modules=TARGETS)
            root = "needs_calibration" if layout == "gradient" else "experiments"
            out[f"{root}/spectral/llama-3.2-3B-{layout}-k{k}-lr_{lr:g}"] = (config, {"optimizer_kwargs": {"lr": lr}})
    return out


def write(folder: Path = HERE) -> list[Path]:
    written = []
    for name, (config, params) in experiments().items():
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(target))
        (target / "training_params.json").write_text(json.dumps(params, indent=2) + "\n")
        written.append(target)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
