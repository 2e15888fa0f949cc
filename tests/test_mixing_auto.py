"""A mixer model is a transformers model: its own model type, the Auto classes, pipeline, a model card."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import VOCAB, make_gpt2, make_llama
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, pipeline

import hf_spectral  # noqa: F401  (registers the mixer model types)
from hf_spectral.mixing import (
    SpectralMixer,
    SpectralMixingConfig,
    SpectralMixingGPT2LMHeadModel,
    SpectralMixingLlamaForCausalLM,
    from_pretrained,
    replace_attention,
)

FACTORIES = {"gpt2": make_gpt2, "llama": make_llama}
CLASSES = {"gpt2": SpectralMixingGPT2LMHeadModel, "llama": SpectralMixingLlamaForCausalLM}


def trained_mixer(name="gpt2", **settings):
    """A mixer model moved off its init (so a model rebuilt from scratch would not match it)."""
    model = replace_attention(FACTORIES[name](), SpectralMixingConfig(**settings))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_auto_class_rebuilds_the_mixer_with_identical_logits(tmp_path, name):
    model = trained_mixer(name, prior_weight=0.1)
    assert type(model) is CLASSES[name]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"hf_spectral_mixing_{name}"
    assert saved["architectures"] == [CLASSES[name].__name__]
    assert "pip install hf-spectral" in saved["hf_spectral"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", revision="main")
    assert type(loaded) is CLASSES[name]
    assert sum(isinstance(m, SpectralMixer) for m in loaded.modules()) == 2
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(logits(from_pretrained(tmp_path)), logits(model))  # the thin wrapper
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)


def test_save_pretrained_writes_a_model_card_naming_the_architecture(tmp_path):
    trained_mixer().save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "SpectralMixingGPT2LMHeadModel" in card and "hf_spectral_mixing_gpt2" in card
    assert "import hf_spectral" in card and '"n_atoms": 31' in card
    assert card.startswith("---\nlibrary_name: transformers\n")


def test_push_to_hub_replaces_transformers_generic_card_with_the_mixer_card(tmp_path, monkeypatch):
    from transformers.utils import hub

    model = trained_mixer()
    uploaded = {}

    def upload(self, working_dir, repo_id, **kwargs):
        uploaded.update({p: open(os.path.join(working_dir, p)).read() for p in ("README.md", "config.json")})

    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda *a, **k: type("R", (), {"repo_id": "o/m"})()})())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: _generic_card())
    model.push_to_hub("o/m")
    assert "SpectralMixingGPT2LMHeadModel" in uploaded["README.md"]
    assert "automatically generated" not in uploaded["README.md"]
    assert json.loads(uploaded["config.json"])["model_type"] == "hf_spectral_mixing_gpt2"


def _generic_card():
    from huggingface_hub import ModelCard, ModelCardData

    text = "This model card has been automatically generated."
    return ModelCard.from_template(ModelCardData(library_name="transformers"), model_description=text)


def test_from_config_builds_a_mixer_model():
    config = trained_mixer("llama").config
    fresh = AutoModelForCausalLM.from_config(config)
    assert type(fresh) is SpectralMixingLlamaForCausalLM
    assert sum(isinstance(m, SpectralMixer) for m in fresh.modules()) == 2


def test_pipeline_generates_what_the_model_generates(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(48 + i): i for i in range(VOCAB)}  # one character per token id
    core = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="0", eos_token="0").save_pretrained(tmp_path)
    model = trained_mixer()
    model.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is SpectralMixingGPT2LMHeadModel
    assert torch.equal(logits(generator.model), logits(model))
    prompt = "ABCDE"
    text = generator(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    expected = model.generate(torch.tensor([[vocab[c] for c in prompt]]), max_new_tokens=6, do_sample=False)
    assert text.replace(" ", "") == "".join(chr(48 + int(i)) for i in expected[0, len(prompt):])  # decoder adds spaces


def test_replace_attention_keeps_other_classes_but_marks_their_config():
    from transformers import GPT2Model

    body = GPT2Model(make_gpt2().config)
    replace_attention(body)
    assert type(body) is GPT2Model and body.config.model_type == "hf_spectral_mixing_gpt2"


def test_the_earlier_format_still_loads_with_the_wrapper(tmp_path):
    model = trained_mixer()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])  # what earlier releases wrote
    config.pop("hf_spectral")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is SpectralMixingGPT2LMHeadModel
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="earlier format.*save_pretrained it again"):
        from_pretrained(tmp_path, revision="v1")


def test_a_plain_model_is_not_a_mixer_model(tmp_path):
    make_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a spectral-mixer model"):
        from_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is GPT2LMHeadModel


LOAD = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
print(type(model).__name__, float(model(input_ids=torch.arange(8)[None]).logits.sum()))
"""


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_a_program_that_never_imports_hf_spectral_loads_the_mixer(tmp_path):
    model = trained_mixer()
    model.save_pretrained(tmp_path)
    out = _run(LOAD.format(path=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    name, total = out.stdout.split()
    assert name == "SpectralMixingGPT2LMHeadModel"
    assert float(total) == pytest.approx(float(logits(model, torch.arange(8)[None]).sum()), rel=1e-6)


@pytest.mark.slow
def test_transformers_alone_refuses_the_mixer_and_the_config_names_the_fix(tmp_path):
    trained_mixer().save_pretrained(tmp_path)
    out = _run(LOAD.format(path=str(tmp_path)), HF_SPECTRAL_AUTOLOAD="0")
    assert out.returncode != 0
    assert "model type `hf_spectral_mixing_gpt2`" in out.stderr  # not a quietly rebuilt attention model
    assert "import hf_spectral" in json.loads((tmp_path / "config.json").read_text())["hf_spectral"]


REGISTERED = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING as M; "
              "print(M['hf_spectral_mixing_gpt2'].__name__ == 'SpectralMixingGPT2Config')")


def test_the_autoload_stand_in_names_the_real_classes_in_transformers_own_table():
    # the hook fills CONFIG_MAPPING's private name table and module cache: fail loudly if transformers changes them
    from transformers.models.auto import configuration_auto

    import hf_spectral_autoload
    from hf_spectral.mixing.configuration import CONFIG_CLASSES

    assert hf_spectral_autoload._MIXER_CONFIGS == {c.model_type: c.__name__ for c in CONFIG_CLASSES.values()}
    mapping = configuration_auto.CONFIG_MAPPING
    assert isinstance(mapping._mapping, dict) and isinstance(mapping._modules, dict)
    assert configuration_auto.model_type_to_module_name("hf_spectral_mixing_gpt2") == "hf_spectral_mixing_gpt2"
    assert mapping["hf_spectral_mixing_llama"] is CONFIG_CLASSES["llama"]


@pytest.mark.slow
@pytest.mark.parametrize("first", [
    "from transformers import AutoModelForCausalLM",
    "from transformers import AutoConfig",
    "import peft",
    "import hf_spectral; import peft",
    "from transformers import pipeline; import hf_spectral",
])
def test_every_import_order_registers_the_mixer_types(first):
    # transformers' Auto modules, peft and hf_spectral import one another: registration must land in each order
    out = _run(f"{first}; {REGISTERED}", PYTHONWARNINGS="error::UserWarning")
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


@pytest.mark.slow
def test_push_to_hub_and_load_by_repo_id_with_revision_dtype_and_device_map(tmp_path):
    from ecosystem_utils import TESTS_DIR, run_checked, subprocess_env
    from hub_server import LocalHub

    hub = LocalHub().start()
    try:
        env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                             HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_local_test_token")
        result = run_checked([sys.executable, str(TESTS_DIR / "workers" / "mixing_hub_client.py")], timeout=240, env=env)
        results = json.loads(result.stdout.strip().splitlines()[-1])
        card = hub.files["test-org/tiny-mixer"]["README.md"].decode()
    finally:
        hub.stop()
    assert [request for request in hub.unhandled if "test-org" in request[1]] == []  # (kernels asks about its own org)
    assert results == {"class": "SpectralMixingGPT2LMHeadModel", "max_abs_diff": 0.0,
                       "bf16_linear": "torch.bfloat16", "bf16_dictionary": "torch.float32"}
    assert "SpectralMixingGPT2LMHeadModel" in card and "automatically generated" not in card
