"""The documentation's code runs as written, so it cannot rot.

Every ```python block of README.md, docs/*.md and recipes/*/README.md runs in its own process, in an empty
folder, offline (``HF_HUB_OFFLINE=1``), unless the line before it says why it cannot:

    <!-- no-test: a fragment of a training script (model, args) -->

A block whose placeholders name things it needs (``BASE``, ``MODEL``) says which setup makes them:

    <!-- test-setup: base_and_adapter -->

(the functions in ``SETUPS`` below build the files in the folder and define the names). A ```bash block runs
only when marked ``<!-- test: shell -->``: most shell blocks install packages or train for minutes. The commands
that answer in seconds are run by the tests at the bottom.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from ecosystem_utils import REPO_ROOT, bin_of, subprocess_env

pytestmark = pytest.mark.slow

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "recipes").glob("*/README.md"))]
# pages that continue one code fragment in the next (names defined in the prose); their own tests run the code
UNMARKED_FRAGMENTS = {"docs/mixing.md": "tests/test_mixing.py"}
BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<code>.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*(?P<kind>no-test|test-setup|test):\s*(?P<value>.*?)\s*-->\s*\Z", re.S)
TIMEOUT_S = 240


def _blocks(lang: str) -> list:
    """``pytest.param(path, line, code, marker)`` for each ``lang`` block, its marker the comment just above it."""
    found = []
    for path in DOCS:
        name = path.relative_to(REPO_ROOT).as_posix()
        if name in UNMARKED_FRAGMENTS:
            continue
        text = path.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            if match["lang"] != lang:
                continue
            before = text[: match.start()].rstrip("\n")
            marker = MARKER.search(before[-300:])
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(name, line, match["code"],
                                      (marker["kind"], marker["value"]) if marker else None, id=f"{name}:{line}"))
    return found


def _tiny_llama(folder: Path, hidden: int = 128) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def _base_and_adapter(folder: Path, stack) -> tuple[str, dict]:
    """``BASE``: a tiny Llama's folder, and ``my-spectral-adapter``: a delta adapter on it (docs/serving.md)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_spectral import SpectralConfig

    _tiny_llama(folder / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "base"),
                           SpectralConfig(n_coefficients=200, init_weights=False))
    model.save_pretrained(folder / "my-spectral-adapter")
    return 'BASE = "base"\n', {}


def _compressed(folder: Path, stack) -> tuple[str, dict]:
    """``MODEL`` and ``DIR``: a tiny Llama's folder and what ``hf-spectral compress`` wrote from it (docs/cli.md)."""
    from hf_spectral.cli import main

    _tiny_llama(folder / "base")
    assert main(["compress", str(folder / "base"), "--fraction", "0.5", "--out", str(folder / "out")]) == 0
    return 'MODEL, DIR = "base", "out"\n', {}


def _local_hub(stack):
    """The test Hub (tests/hub_server.py) on 127.0.0.1, and the environment that points a process at it."""
    from hub_server import LocalHub

    hub = LocalHub().start()
    stack.callback(hub.stop)
    env = dict(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0",
               HF_TOKEN="hf_local_test_token")
    return hub, env


def _hub_with_a_base(folder: Path, stack) -> tuple[str, dict]:
    """``base``: a tiny Llama, for the push in docs/hub.md to a local Hub."""
    _tiny_llama(folder / "base")
    prelude = 'from transformers import AutoModelForCausalLM\nbase = AutoModelForCausalLM.from_pretrained("base")\n'
    return prelude, _local_hub(stack)[1]


def _hub_with_an_adapter(folder: Path, stack) -> tuple[str, dict]:
    """``org/base`` and ``you/my-spectral-adapter`` (a delta adapter on it) on a local Hub, for the load."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_spectral import SpectralConfig

    hub, env = _local_hub(stack)
    _tiny_llama(folder / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "base"),
                           SpectralConfig(n_coefficients=200, task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = "org/base"  # what a model loaded from the Hub records
    with warnings.catch_warnings():  # PEFT looks for org/base's config to check the vocabulary: not here yet
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(folder / "adapter")
    hub.put_folder("org/base", folder / "base")
    hub.put_folder("you/my-spectral-adapter", folder / "adapter")
    return "", env


SETUPS = {"base_and_adapter": _base_and_adapter, "compressed": _compressed, "hub_with_a_base": _hub_with_a_base,
          "hub_with_an_adapter": _hub_with_an_adapter}


def _run(args: list[str], folder: Path, **env: str) -> subprocess.CompletedProcess:
    env = subprocess_env(**{"HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / ".hf_home"), **env})
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n"
        f"--- stderr ---\n{result.stderr[-5000:]}"
    )
    return result


@pytest.mark.parametrize(("doc", "line", "code", "marker"), _blocks("python"))
def test_python_block_runs_as_written(doc, line, code, marker, tmp_path):
    prelude, env = "", {}
    with contextlib.ExitStack() as stack:
        if marker is not None:
            kind, value = marker
            if kind == "no-test":
                assert value, f"{doc}:{line}: say why the block cannot run (<!-- no-test: reason -->)"
                pytest.skip(value)
            assert kind == "test-setup" and value in SETUPS, f"{doc}:{line}: unknown marker {marker}; see SETUPS"
            prelude, env = SETUPS[value](tmp_path, stack)
        (tmp_path / "snippet.py").write_text(prelude + code, encoding="utf-8")
        _run([sys.executable, "snippet.py"], tmp_path, **env)


@pytest.mark.parametrize(("doc", "line", "code", "marker"), _blocks("bash"))
def test_marked_shell_block_runs_as_written(doc, line, code, marker, tmp_path):
    if marker != ("test", "shell"):
        pytest.skip("a shell block runs only when marked <!-- test: shell -->")
    # from the repository root, as the docs' commands are written; `python` is the interpreter running the tests
    script = f'export PATH="{Path(sys.executable).parent}:$PATH"\nset -e\n{code}'
    _run(["bash", "-c", script], REPO_ROOT)


# --------------------------------------------------------------------------------------------------
# commands from docs/cli.md that answer in seconds


def test_cli_help_and_inspect_run_as_documented(tmp_path):
    assert "inspect" in _run([bin_of("hf-spectral"), "--help"], tmp_path).stdout
    assert "inspect" in _run([sys.executable, "-m", "hf_spectral.cli", "--help"], tmp_path).stdout
    adapter = REPO_ROOT / "tests" / "golden" / "v0.1.0" / "linear-delta-random-dct"
    result = _run([bin_of("hf-spectral"), "inspect", str(adapter)], tmp_path)
    assert "mode: delta" in result.stdout and "model.layers.0.self_attn.q_proj" in result.stdout
    assert result.stderr == ""  # quiet by default: no warnings of optional libraries (hf_spectral_cli.py)
