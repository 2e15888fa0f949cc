"""A saved spectral adapter loads in a program that never imports hf_spectral."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

LOAD = """
import sys
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel
cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
model = PeftModel.from_pretrained(GPT2LMHeadModel(cfg), {path!r})
print(type(model.base_model).__name__)
"""


def _save_adapter(path) -> None:
    import torch
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_spectral import SpectralConfig

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    config = SpectralConfig(n_coefficients=10, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(GPT2LMHeadModel(cfg), config).save_pretrained(path)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


@pytest.mark.slow
def test_the_pth_hook_is_installed_and_costs_nothing_at_startup():
    assert (Path(sysconfig.get_paths()["purelib"]) / "hf_spectral_autoload.pth").exists()
    out = _run("import sys; print('torch' in sys.modules, 'peft' in sys.modules)")
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.slow
def test_load_without_importing_hf_spectral(tmp_path):
    _save_adapter(tmp_path)
    out = _run(LOAD.format(path=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SpectralModel"


@pytest.mark.slow
def test_turning_the_hook_off_gives_peft_its_plain_error(tmp_path):
    # documented: with HF_SPECTRAL_AUTOLOAD=0 the program must `import hf_spectral` itself
    _save_adapter(tmp_path)
    out = _run(LOAD.format(path=str(tmp_path)), HF_SPECTRAL_AUTOLOAD="0")
    assert out.returncode != 0 and "KeyError: 'SPECTRAL'" in out.stderr


# ``import hf_spectral`` registers the method at once, in every import order, without the hook

REGISTERED = (
    "import peft; from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as M; "
    "print(getattr(peft.PeftType, 'SPECTRAL', None) in M)"
)

ORDERS = {
    # the package first, then peft, then a public name
    "package-then-peft": "import hf_spectral; from peft import get_peft_model; from hf_spectral import SpectralConfig; "
    "from transformers import GPT2Config, GPT2LMHeadModel; "
    "m = get_peft_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)), "
    "SpectralConfig(n_coefficients=10, target_modules=['c_attn'])); print(type(m.base_model).__name__)",
    # a submodule first: the package's __init__ runs first and registers
    "submodule-first": "from hf_spectral.config import SpectralConfig; " + REGISTERED,
    # peft already imported: registration happens during `import hf_spectral`
    "peft-first": "import peft, hf_spectral; " + REGISTERED,
}


@pytest.mark.slow
def test_import_hf_spectral_registers_at_once():
    out = _run("import hf_spectral, sys; " + REGISTERED, HF_SPECTRAL_AUTOLOAD="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.slow
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_import_hf_spectral_registers_in_every_order_without_the_hook(order):
    out = _run(ORDERS[order], HF_SPECTRAL_AUTOLOAD="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in ("True", "SpectralModel"), out.stdout


@pytest.mark.slow
def test_the_hook_survives_a_find_spec_that_does_not_import():
    # transformers' is_peft_available() asks importlib.util.find_spec("peft") long before anyone imports peft
    code = "import importlib.util; importlib.util.find_spec('peft'); " + REGISTERED
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
