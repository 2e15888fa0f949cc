"""Hub round trip against a local Hub server (tests/hub_server.py) with the real client code.

``tests/workers/hub_client.py`` runs in a subprocess with ``HF_ENDPOINT`` pointing at the server (the
client reads it at import): it pushes a tiny GPT-2, then spectral adapters in both modes with
``model.push_to_hub``, loads each back with ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` from the repo, runs ``hf-spectral inspect`` on the repo id, and pushes a
LoRA model to check that other PEFT methods keep transformers' own push.
"""

from __future__ import annotations

import json
import sys

import pytest
import safetensors.torch
import yaml
from ecosystem_utils import TESTS_DIR, run_checked, subprocess_env
from hub_server import LocalHub

pytestmark = pytest.mark.slow  # the client runs in its own interpreter


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    hub = LocalHub().start()
    try:
        env = subprocess_env(
            HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
            HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_TOKEN="hf_local_test_token",
        )
        result = run_checked([sys.executable, str(TESTS_DIR / "workers" / "hub_client.py")], timeout=240, env=env)
        yield hub, json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        hub.stop()


def _card(text: str) -> tuple[dict, str]:
    _, front, body = text.split("---", 2)
    return yaml.safe_load(front), body


def _namespace(path: str) -> str | None:
    """The user or organisation a Hub request is about (``/api/models/{ns}/...``, ``/api/organizations/{ns}/...``,
    ``/{ns}/{repo}/resolve/...``), or None for a request about no namespace (``/api/whoami-v2``, ...)."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[0] == "api":
        kinds = ("models", "datasets", "spaces", "organizations", "users")
        return parts[2] if len(parts) > 2 and parts[1] in kinds else None
    return parts[0] if len(parts) > 2 and "resolve" in parts else None


def test_the_client_only_used_endpoints_the_server_speaks(pushed):
    # What hf_spectral's own code asks (push, load, inspect) concerns the test's repos or no namespace at all;
    # requests about other publishers come from dependencies (transformers asks about kernel publishers when
    # the `kernels` package is installed) and are not this project's protocol.
    hub, _ = pushed
    ours = {hub.namespace} | {repo.split("/")[0] for repo in hub.files}
    unhandled = [(method, path) for method, path in hub.unhandled if _namespace(path) in ours | {None}]
    assert unhandled == []
    assert ("POST", "/api/models/test-org/tiny-spectral-delta/commit/main") in hub.requests


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_push_uploads_config_weights_and_a_spectral_card_in_one_commit(pushed, mode):
    hub, results = pushed
    repo = f"test-org/tiny-spectral-{mode}"
    files = hub.files[repo]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    commits = [c for c in hub.commits if c["repo"] == repo and c["summary"] != "initial commit"]
    assert len(commits) == 1 and set(commits[0]["paths"]) == {"adapter_config.json", "adapter_model.safetensors",
                                                              "README.md"}
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "SPECTRAL" and config["mode"] == mode
    assert config["base_model_name_or_path"] == "test-org/tiny-gpt2"

    meta, body = _card(files["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["base_model"] == "test-org/tiny-gpt2"
    assert "hf-spectral" in meta["tags"] and f"spectral-{mode}" in meta["tags"]
    assert "transformers model that has been pushed on the Hub" not in body  # not the generic card
    assert f"| mode | {mode} |" in body
    assert f"| layout (which coefficients are kept) | {config['layout']} |" in body
    assert "| base model | test-org/tiny-gpt2 |" in body
    assert f"| trainable parameters (saved) | {results[mode]['trainable']:,} |" in body
    assert "import hf_spectral" in body and f"PeftModel.from_pretrained(base, '{repo}')" in body
    # K per layer: one table row per spectral layer, with the K of the saved tensor
    tensors = safetensors.torch.load(files["adapter_model.safetensors"])
    coefficients = {k: v for k, v in tensors.items() if k.endswith(".spectral_coefficients")}
    assert coefficients
    for key, value in coefficients.items():
        layer = key.removeprefix("base_model.model.").removesuffix(".spectral_coefficients")
        m, n = config["layer_shapes"][layer]
        assert f"| `{layer}` | {m} x {n} | {value.numel()} |" in body


@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_an_adapter_loaded_from_the_repo_gives_identical_logits(pushed, mode):
    _, results = pushed
    assert results[mode]["max_abs_diff"] == 0.0  # PeftModel.from_pretrained(base, repo_id)
    assert results[mode]["auto_max_abs_diff"] == 0.0  # AutoPeftModelForCausalLM.from_pretrained(repo_id)


def test_inspect_reads_a_repo_id(pushed):
    _, results = pushed
    report = results["delta"]
    assert report["inspect_exit"] == 0
    assert "mode: delta" in report["inspect"] and "transformer.h.0.attn.c_attn  96 x 32" in report["inspect"]


def test_other_peft_methods_keep_transformers_push(pushed):
    hub, _ = pushed
    readme = hub.files["test-org/tiny-lora"]["README.md"].decode()
    meta, body = _card(readme)
    assert meta["library_name"] == "transformers"
    assert "hf_spectral" not in readme
