"""What hf_spectral relies on in PEFT's internals. If a peft release changes any of it, these
tests fail here, loudly, rather than in a user's training run."""

import inspect
import json
import subprocess
import sys

import peft
import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType, register_peft_method

import hf_spectral
from hf_spectral import SpectralConfig, SpectralModel
from hf_spectral._peft_registry import register


def test_peft_type_enum_is_extended():
    assert PeftType.SPECTRAL is hf_spectral.SPECTRAL_PEFT_TYPE
    assert PeftType("SPECTRAL") is PeftType.SPECTRAL and PeftType["SPECTRAL"] is PeftType.SPECTRAL
    assert PeftType.SPECTRAL in list(PeftType) and PeftType.SPECTRAL == "SPECTRAL"
    # transformers' own PEFT loader does this with the type
    assert PeftType.SPECTRAL.value.lower() == "spectral"


def test_mappings_are_filled():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPECTRAL] is SpectralConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPECTRAL] is SpectralModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPECTRAL] == "spectral_"
    # the config as saved on disk maps back through the plain string
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SPECTRAL"] is SpectralConfig


def test_registering_again_is_a_no_op():
    register(SpectralConfig, SpectralModel)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPECTRAL] is SpectralModel


def test_peft_internals_we_rely_on_are_still_there():
    members = ("_member_map_", "_value2member_map_", "_member_names_")
    assert all(hasattr(PeftType, m) for m in members)
    assert {"name", "config_cls", "model_cls", "prefix"} <= set(inspect.signature(register_peft_method).parameters)
    for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"):
        assert isinstance(inspect.getattr_static(BaseTuner, hook), classmethod), hook
    for hook in ("_pre_injection_hook", "_check_new_adapter_config", "_mark_only_adapters_as_trainable", "_unload_and_optionally_merge"):
        assert callable(getattr(BaseTuner, hook)), hook
    assert "persistent" in inspect.signature(BufferDict.__init__).parameters
    assert peft.__version__.startswith("0.21."), f"tested with peft 0.21, found {peft.__version__}"


def test_config_round_trips_through_json(tmp_path):
    config = SpectralConfig(mode="replace", coefficient_fraction=0.25, layout="banded", target_modules=["q", "v"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPECTRAL" and saved["mode"] == "replace"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpectralConfig) and loaded.coefficient_fraction == 0.25 and loaded.layout == "banded"


@pytest.mark.slow  # starts an interpreter
def test_import_twice_in_a_fresh_interpreter():
    code = "import importlib, hf_spectral; importlib.reload(hf_spectral); import peft; print(peft.PeftType.SPECTRAL.value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SPECTRAL"


@pytest.mark.parametrize("unused", [None])
def test_prefix_is_unique(unused):
    owners = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == "spectral_"]
    assert owners == [PeftType.SPECTRAL]


def test_private_peft_names_are_imported_in_peft_registry_only():
    import ast
    from pathlib import Path

    from hf_spectral import _peft_registry

    for name in ("BufferDict", "filter_state_dict_by_key_prefixes", "tuner_state_dict_key_prefixes", "is_key_under_prefixes"):
        assert callable(getattr(_peft_registry, name)), name
    package = Path(hf_spectral.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        if path.name == "_peft_registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peft":
                private = any(part.startswith("_") for part in node.module.split("."))
                private = private or any(alias.name.startswith("_") for alias in node.names)
                if private:
                    found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert found == [], f"private PEFT names imported outside _peft_registry.py: {found}"
