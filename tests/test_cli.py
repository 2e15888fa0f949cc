"""The hf-spectral command line: inspect, compress and spectrum on tiny models, and its errors.

The commands run in-process through ``hf_spectral.cli.main`` (each subprocess would pay ~10 s of
imports); one test runs the installed console script to check the entry point and that a bad
argument gives a message and exit status 2, not a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.fft
import torch
from ecosystem_utils import bin_of, subprocess_env, tiny_gpt2, token_rows
from hf_spectral.ecosystem.adapter_files import layer_matrices, read_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_gpt2
from transformers import AutoModelForCausalLM

from hf_spectral import SpectralConfig, SpectralLayer
from hf_spectral.cli import main
from hf_spectral.cli.common import model_order
from hf_spectral.cli.spectrum import spectral_norm


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2(seed=0).save_pretrained(folder)
    return str(folder)


def _adapter(base_dir, folder, **kwargs):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), SpectralConfig(**kwargs))
    model.save_pretrained(folder)
    return model


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _dense_weights(base_dir) -> dict[str, np.ndarray]:
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return {
        name: (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().double().numpy()
        for name, m in model.named_modules()
        if isinstance(m, Conv1D)
    }


# ------------------------------------------------------------------------------------------------
# inspect


def test_other_libraries_are_quiet_unless_verbose_and_their_settings_come_back():
    import logging

    from transformers.utils import logging as hf_logging

    from hf_spectral.cli.common import OPTIONAL_EXTRAS_LOGGERS, quiet_libraries

    before = (hf_logging.get_verbosity(), [logging.getLogger(n).level for n in OPTIONAL_EXTRAS_LOGGERS])
    with quiet_libraries():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert all(logging.getLogger(n).level == logging.ERROR for n in OPTIONAL_EXTRAS_LOGGERS)
    assert (hf_logging.get_verbosity(), [logging.getLogger(n).level for n in OPTIONAL_EXTRAS_LOGGERS]) == before
    with quiet_libraries(verbose=True):
        assert hf_logging.get_verbosity() == before[0]
        assert all(logging.getLogger(n).level == level for n, level in zip(OPTIONAL_EXTRAS_LOGGERS, before[1],
                                                                            strict=True))


def test_verbose_goes_before_the_command(base_dir, tmp_path, capsys):
    folder = tmp_path / "delta"
    _adapter(base_dir, folder, target_modules=["c_attn"], n_coefficients=8)
    code, out, _ = _run(capsys, "--verbose", "inspect", folder)
    assert code == 0 and "transformer.h.0.attn.c_attn" in out


def test_inspect_reports_mode_layout_k_shapes_counts_and_size(base_dir, tmp_path, capsys):
    folder = tmp_path / "delta"
    _adapter(base_dir, folder, target_modules=["c_attn", "c_fc"], n_coefficients=40, layout="energy",
             init_weights=False)
    code, out, _ = _run(capsys, "inspect", folder, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["mode"] == "delta" and report["layout"] == "energy" and report["base_model"] == base_dir
    shapes = {layer["name"]: (layer["shape"], layer["n_coefficients"], layer["indices"]) for layer in report["layers"]}
    assert shapes == {
        f"transformer.h.{i}.{name}": (shape, 40, "saved")
        for i in range(2)
        for name, shape in (("attn.c_attn", [96, 32]), ("mlp.c_fc", [128, 32]))
    }
    assert report["spectral_parameters"] == 160 and report["other_parameters"] == 0
    assert report["size_on_disk"] == sum(os.path.getsize(folder / f) for f in os.listdir(folder))

    code, out, _ = _run(capsys, "inspect", folder)
    assert code == 0
    assert "mode: delta   layout: energy" in out and "transformer.h.1.mlp.c_fc     128 x 32          40" in out


def test_inspect_counts_the_other_parameters_of_a_replace_adapter(base_dir, tmp_path, capsys):
    folder = tmp_path / "replace"
    model = _adapter(base_dir, folder, mode="replace", coefficient_fraction=0.5, layout="lowfreq")
    code, out, _ = _run(capsys, "inspect", folder, "--json")
    report = json.loads(out)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    coefficients = sum(p.numel() for n, p in model.named_parameters() if "spectral_coefficients" in n)
    assert code == 0 and report["mode"] == "replace"
    assert report["spectral_parameters"] == coefficients
    assert report["total_parameters"] == trainable  # the adapter holds everything that trains


# ------------------------------------------------------------------------------------------------
# compress


def test_compress_keeps_the_largest_coefficients_and_reports_true_errors(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "compressed"
    code, out, _ = _run(capsys, "compress", base_dir, "--fraction", "0.25", "--out", out_dir)
    assert code == 0
    report = json.loads((out_dir / "compression.json").read_text())
    dense = _dense_weights(base_dir)
    assert {r["name"] for r in report["layers"]} == set(dense)
    for record in report["layers"]:
        # independent reference: scipy's DCT, keep the K largest magnitudes, measure what is lost
        w = dense[record["name"]]
        s = scipy.fft.dctn(w, norm="ortho").ravel()
        k = round(0.25 * w.size)
        dropped = np.sort(np.abs(s))[: w.size - k]
        assert record["n_coefficients"] == k
        assert record["relative_error"] == pytest.approx(np.linalg.norm(dropped) / np.linalg.norm(s), rel=1e-4)
        assert f"{record['relative_error']:.4f}" in out
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    saved = sum(w.size for w in dense.values()) - sum(r["n_coefficients"] for r in report["layers"])
    assert report["parameters_before"] == base_params and report["parameters_after"] == base_params - saved
    assert f"whole model:  {base_params:,} -> {base_params - saved:,} parameters" in out
    assert "import hf_spectral" in (out_dir / "README.md").read_text()


def test_compress_at_fraction_one_is_lossless_and_the_output_loads(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "full"
    # every coefficient kept: the adapter's longer tensor names make its file a little larger than the dense one
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "1", "--layout", "lowfreq", "--out", out_dir,
                        "--allow-growth")
    assert code == 0 and "writing it (--allow-growth)" in err
    report = json.loads((out_dir / "compression.json").read_text())
    assert max(r["relative_error"] for r in report["layers"]) < 1e-6
    inputs = token_rows(2, seed=5)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, base(input_ids=inputs).logits,
                                   atol=1e-4, rtol=1e-4)
    assert all(m.get_base_layer().weight is None for m in loaded.modules() if isinstance(m, SpectralLayer))


def test_compress_reports_bytes_before_and_after_as_they_are_held_and_written(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "half"
    code, out, _ = _run(capsys, "compress", base_dir, "--fraction", "0.5", "--out", out_dir)
    assert code == 0
    report = json.loads((out_dir / "compression.json").read_text())
    before, after, layers = report["bytes_before"], report["bytes_after"], report["layers"]
    dense_file = os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    assert before["model_files"] == {"model.safetensors": dense_file} and before["model_on_disk"] == dense_file
    dense = AutoModelForCausalLM.from_pretrained(base_dir)
    assert before["model_in_memory"] == sum(p.numel() * 4 for p in dense.parameters()) + sum(
        b.numel() * b.element_size() for b in dense.buffers())
    sizes = [r["shape"][0] * r["shape"][1] for r in layers]
    assert before["compressed_layers"] == 4 * sum(sizes)
    # energy at 0.5: float32 coefficients with int32 positions in memory; a bitmap of m x n bits on disk
    assert all(r["index_set"] == "saved as a bitmap" for r in layers)
    assert after["compressed_layers_in_memory"] == sum(8 * r["n_coefficients"] for r in layers)
    assert after["compressed_layers_on_disk"] == sum(4 * r["n_coefficients"] + -(-s // 8) for r, s in
                                                     zip(layers, sizes, strict=True))
    written = os.path.getsize(out_dir / "adapter_model.safetensors")
    assert after["model_on_disk"] == written == after["written_files"]["adapter_model.safetensors"]
    assert abs(after["predicted_weights_file"] - written) <= 0.01 * written  # the header estimated
    assert written < dense_file and after["model_in_memory"] <= before["model_in_memory"]
    # the evaluation weight cache: one float32 dense weight per layer on top
    assert after["weight_cache"] == 4 * sum(sizes)
    assert after["model_in_memory_with_cache"] == after["model_in_memory"] + after["weight_cache"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_dir)
    from hf_spectral.cli.compress import resident_bytes

    assert resident_bytes(loaded) == after["model_in_memory"]
    assert "whole model, on disk (model.safetensors -> adapter_model.safetensors)" in out
    assert "set_weight_cache(model, False)" in out and "written: adapter_model.safetensors" in out


def test_compress_refuses_a_result_larger_than_the_dense_model_before_writing(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "grown"
    # every coefficient in float32, and a bitmap per layer on top
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "1", "--out", out_dir)
    assert code == 1
    assert "would be larger than the dense one" in err and "on disk against the dense model's" in err
    assert "--allow-growth" in err and "Nothing was written" in err
    assert not out_dir.exists()
    code, _, _ = _run(capsys, "compress", base_dir, "--fraction", "1", "--out", out_dir, "--allow-growth")
    assert code == 0 and (out_dir / "adapter_model.safetensors").is_file()


def test_compress_measures_growth_against_the_dense_weights_it_loaded_not_the_input_files(tmp_path, capsys):
    # the model stored in bf16 (like a quantized .gguf: smaller than the dense weights it holds), loaded in fp32
    stored = tmp_path / "bf16"
    tiny_gpt2(seed=0).to(torch.bfloat16).save_pretrained(stored)
    dense_fp32 = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(stored).parameters())
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "compress", stored, "--fraction", "0.75", "--layout", "lowfreq", "--out", out_dir)
    assert code == 0, err
    report = json.loads((out_dir / "compression.json").read_text())
    written = report["bytes_after"]["model_on_disk"]
    assert report["bytes_before"]["dense_weights"] == dense_fp32
    # larger than the bf16 file, smaller than the fp32 weights it was compressed from: no growth, no refusal
    assert report["bytes_before"]["model_on_disk"] < written < dense_fp32
    assert "whole model, dense weights as loaded (float32) -> adapter_model.safetensors" in out
    assert "larger than the dense one" not in err


def test_compress_does_not_advise_the_layout_the_run_already_used(base_dir, tmp_path, capsys):
    # every coefficient kept: the adapter's longer tensor names make its file a little larger than the dense one
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "1", "--layout", "lowfreq",
                        "--out", tmp_path / "full")
    assert code == 1 and "would be larger than the dense one" in err and "Lower --fraction" in err
    assert "--layout lowfreq" not in err and "index set" not in err
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "1", "--out", tmp_path / "full")
    assert code == 1 and "use --layout lowfreq or triangle" in err


@pytest.fixture(scope="module")
def base_with_tokenizer(tmp_path_factory):
    """The tiny GPT-2 with a character tokenizer beside it, and a text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2_tokenizer")
    text = "the quick brown fox jumps over the lazy dog; " * 20
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(folder)
    tiny_gpt2(seed=0).save_pretrained(folder)
    (folder / "text.txt").write_text(text)
    return folder


def _perplexity(model, rows) -> float:
    with torch.no_grad():
        losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in rows]
    return float(np.exp(np.mean(losses)))


def test_compress_prints_the_perplexity_before_and_after_on_the_same_windows(base_with_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder, out_dir = base_with_tokenizer, tmp_path / "c"
    code, out, _ = _run(capsys, "compress", folder, "--fraction", "0.5", "--out", out_dir, "--text",
                        folder / "text.txt", "--eval-windows", "3", "--eval-length", "16")
    assert code == 0
    ids = AutoTokenizer.from_pretrained(folder)((folder / "text.txt").read_text(), add_special_tokens=False)["input_ids"]
    span = len(ids) - 16
    rows = torch.tensor([ids[s:s + 16] for s in (0, round(span / 2), span)])  # evenly spaced, first to last
    report = json.loads((out_dir / "compression.json").read_text())["perplexity"]
    assert report["windows"] == 3 and report["length"] == 16
    assert report["before"] == pytest.approx(_perplexity(AutoModelForCausalLM.from_pretrained(folder).eval(), rows),
                                             rel=1e-5)
    compressed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out_dir).eval()
    assert report["after"] == pytest.approx(_perplexity(compressed, rows), rel=1e-5)
    assert f"{report['before']:.3f} before, {report['after']:.3f} after" in out


def test_compress_text_errors_name_the_value_and_the_fix(base_dir, base_with_tokenizer, tmp_path, capsys):
    text = base_with_tokenizer / "text.txt"
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "0.5", "--out", tmp_path / "a", "--text", text)
    assert code == 1 and "--text needs the model's tokenizer" in err and "tokenizer.save_pretrained" in err
    code, _, err = _run(capsys, "compress", base_with_tokenizer, "--fraction", "0.5", "--out", tmp_path / "b",
                        "--text", text, "--eval-length", "64")
    assert code == 1 and "--eval-length 64 is longer than the model's 32 positions; give at most 32" in err
    code, _, err = _run(capsys, "compress", base_dir, "--fraction", "0.5", "--out", tmp_path / "c",
                        "--text", tmp_path / "missing.txt")
    assert code == 1 and "no such file" in err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_commands_constants_are_the_library_ones():
    from hf_spectral.ecosystem.adapter_files import WEIGHTS_NAME
    from hf_spectral.layouts import LAYOUTS

    from hf_spectral.cli import compress

    assert compress.LAYOUTS == LAYOUTS and compress.WEIGHTS_FILE == WEIGHTS_NAME


# ------------------------------------------------------------------------------------------------
# spectrum


def test_spectrum_of_a_model_writes_a_figure_and_its_stable_ranks(base_dir, tmp_path, capsys):
    png, numbers = tmp_path / "spectrum.png", tmp_path / "spectrum.json"
    code, out, _ = _run(capsys, "spectrum", base_dir, "--out", png, "--json", numbers, "--bins", "8",
                        "--max-panels", "2")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = {layer["name"]: layer for layer in json.loads(numbers.read_text())["layers"]}
    dense = _dense_weights(base_dir)
    assert set(data) == set(dense)  # every linear layer, not the tied head
    for name, w in dense.items():
        singular = np.linalg.svd(w, compute_uv=False)
        assert data[name]["stable_rank"] == pytest.approx((singular**2).sum() / singular[0] ** 2, rel=1e-6)
        s = scipy.fft.dctn(w, norm="ortho")
        low = (s[: (w.shape[0] + 1) // 2, : (w.shape[1] + 1) // 2] ** 2).sum() / (s**2).sum()
        assert data[name]["energy_share_low_quarter"] == pytest.approx(low, rel=1e-6)


@pytest.mark.parametrize(
    "mode,layout,basis",
    [("delta", "random", "dct"), ("delta", "banded", "dct"), ("delta", "triangle", "random_orthonormal"),
     ("replace", "lowfreq", "dct"), ("replace", "energy", "random_orthonormal")],
)
def test_adapter_matrices_from_files_match_the_loaded_layers(base_dir, tmp_path, capsys, mode, layout, basis):
    budget = {"n_coefficients": 60} if mode == "delta" else {"coefficient_fraction": 0.3}
    kwargs = dict(mode=mode, layout=layout, basis=basis, init_weights=False if mode == "delta" else True,
                  seed=3, **budget)
    if mode == "delta":
        kwargs["target_modules"] = ["c_attn", "c_proj"]
    _adapter(base_dir, tmp_path / "a", **kwargs)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "a")
    layers = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules() if isinstance(m, SpectralLayer)}
    rebuilt = {record.name: matrix for record, matrix in layer_matrices(read_adapter(str(tmp_path / "a")))}
    assert set(rebuilt) == set(layers)
    for name, matrix in rebuilt.items():
        layer = layers[name]
        scale = layer.spectral_settings["default"].scaling if mode == "delta" else 1.0
        expected = layer.rebuild("default").double() * scale
        torch.testing.assert_close(matrix, expected, atol=1e-6, rtol=1e-5)
    if layout == "lowfreq":  # the command on an adapter folder (its matrices are the ones checked above)
        code, out, _ = _run(capsys, "spectrum", tmp_path / "a", "--out", tmp_path / "a.png", "--max-panels", "1")
        assert code == 0 and (tmp_path / "a.png").exists() and "transformer.h.1.mlp.c_proj" in out


# ------------------------------------------------------------------------------------------------
# errors: a message and a non-zero exit, never a traceback


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "empty").mkdir()
    get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], r=2)).save_pretrained(folder / "lora")
    shutil.copytree(folder / "lora", folder / "pickled")  # a "spectral" adapter whose weights are a pickle
    (folder / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "SPECTRAL"}))
    os.replace(folder / "pickled" / "adapter_model.safetensors", folder / "pickled" / "adapter_model.bin")
    return folder


@pytest.mark.parametrize(
    "argv,code,message",
    [
        ([], 2, "required: COMMAND"),
        (["shrink", "x"], 2, "invalid choice: 'shrink'"),
        (["compress", "{base}", "--fraction", "0", "--out", "{tmp}/o"], 2, "outside (0, 1]"),
        (["compress", "{base}", "--fraction", "half", "--out", "{tmp}/o"], 2, "is not a number"),
        (["compress", "{base}", "--fraction", "0.5"], 2, "the following arguments are required: --out"),
        (["compress", "{base}", "--fraction", "0.5", "--layout", "zigzag", "--out", "{tmp}/o"], 2, "invalid choice"),
        (["compress", "{tmp}/empty", "--fraction", "0.5", "--out", "{tmp}/o"], 1, "cannot load a model"),
        (["compress", "{base}", "--fraction", "0.5", "--out", "{base}"], 1, "exists and is not empty"),
        (["compress", "{base}", "--fraction", "0.5", "--target-modules", "nope", "--out", "{tmp}/o"], 1, "nope"),
        (["inspect", "{tmp}/empty"], 1, "has no adapter_config.json"),
        (["inspect", "{tmp}/lora"], 1, "not a spectral one"),
        (["inspect", "{tmp}/pickled"], 1, "pickle"),
        (["inspect", "not a repo!"], 1, "neither a local folder nor a valid Hub repo id"),
        (["inspect", "{tmp}/missing"], 1, "/missing': no such file or folder"),
        (["compress", "/nonexistent", "--fraction", "0.5", "--out", "{tmp}/o"], 1, "'/nonexistent': no such file or folder"),
        (["compress", "./nonexistent", "--fraction", "0.5", "--out", "{tmp}/o"], 1, "no such file or folder"),
        (["spectrum", "{tmp}/missing/model", "--out", "{tmp}/s.png"], 1, "no such file or folder"),
        (["spectrum", "{tmp}/lora/adapter_model.safetensors", "--out", "{tmp}/s.png"], 1, "is a file"),
        (["spectrum", "{base}", "--out", "{tmp}/s.txt"], 2, "must end in one of"),
        (["spectrum", "{base}", "--out", "{tmp}/s.png", "--layers", "("], 2, "not a valid regular expression"),
        (["spectrum", "{base}", "--out", "{tmp}/s.png", "--layers", "nothing-matches"], 1, "no linear layers matched"),
    ],
)
def test_bad_arguments_get_a_message_and_a_nonzero_exit(base_dir, bad_inputs, capsys, argv, code, message):
    argv = [a.format(base=base_dir, tmp=bad_inputs) for a in argv]
    got, out, err = _run(capsys, *argv)
    assert got == code, (out, err)
    assert message in err and "Traceback" not in err + out


@pytest.mark.slow
def test_the_console_script_exits_2_with_a_message(tmp_path):
    script = bin_of("hf-spectral")
    command = [script] if os.path.isabs(script) else [sys.executable, "-m", "hf_spectral.cli"]
    result = subprocess.run(command + ["compress", "m", "--fraction", "1.5", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 2
    assert "--fraction: 1.5 is outside (0, 1]" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# a Hub id without network: said at once, not as a side issue


@pytest.fixture
def no_network(monkeypatch):
    """The Hub's endpoint is a closed local port (nothing listens on port 9), and offline mode is off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize(
    "argv",
    [["inspect", "someone/spectral-adapter"], ["compress", "someone/model", "--fraction", "0.5", "--out", "{tmp}/o"],
     ["spectrum", "someone/model", "--out", "{tmp}/s.png"]],
)
def test_a_hub_id_without_network_says_no_network(no_network, tmp_path, capsys, argv):
    import time

    start = time.perf_counter()
    code, out, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 1 and "Traceback" not in err
    assert "no network: 'someone/" in err and "http://127.0.0.1:9" in err and "not a local folder" in err
    assert time.perf_counter() - start < 10  # the probe gives up after 3 s; a refused port answers at once


def test_a_hub_id_in_offline_mode_that_is_not_cached_says_so(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = _run(capsys, "inspect", "someone/never-downloaded")
    assert code == 1 and "HF_HUB_OFFLINE is set" in err and "no copy of it" in err


# ------------------------------------------------------------------------------------------------
# layers in model order


def test_model_order_compares_numbers_as_numbers():
    names = ["model.layers.10.q", "model.layers.2.v", "model.layers.2.q", "model.layers.1.q", "lm.0"]
    assert sorted(names, key=model_order) == [
        "lm.0", "model.layers.1.q", "model.layers.2.q", "model.layers.2.v", "model.layers.10.q"]


def test_inspect_and_spectrum_list_layers_in_model_order(tmp_path, capsys):
    base = tmp_path / "base"
    make_gpt2(n_layer=12, n_embd=8).save_pretrained(base)
    _adapter(str(base), tmp_path / "a", target_modules=["c_attn"], n_coefficients=8, init_weights=False)
    expected = [f"transformer.h.{i}.attn.c_attn" for i in range(12)]

    code, out, _ = _run(capsys, "inspect", tmp_path / "a", "--json")
    assert code == 0 and [layer["name"] for layer in json.loads(out)["layers"]] == expected
    code, out, _ = _run(capsys, "spectrum", tmp_path / "a", "--out", tmp_path / "s.png", "--json", tmp_path / "s.json",
                        "--max-panels", "1", "--bins", "4")
    assert code == 0 and [layer["name"] for layer in json.loads((tmp_path / "s.json").read_text())["layers"]] == expected
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("transformer.")]
    assert rows == expected


# ------------------------------------------------------------------------------------------------
# the stable rank's spectral norm without an SVD


@pytest.mark.parametrize("exact_up_to", [2048, 0], ids=["gram-eigensolve", "lobpcg"])
@pytest.mark.parametrize("shape", [(90, 60), (40, 120), (64, 64)])
def test_spectral_norm_agrees_with_the_svd(exact_up_to, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    noise = torch.randn(*shape, dtype=torch.float64, generator=generator)  # flat spectrum: the hard case
    low_rank = torch.randn(shape[0], 3, dtype=torch.float64, generator=generator) @ \
        torch.randn(3, shape[1], dtype=torch.float64, generator=generator)
    for w in (noise, low_rank + 0.01 * noise, noise.float()):
        exact = np.linalg.svd(w.double().numpy(), compute_uv=False)[0]
        # stated tolerance: 1e-9 relative (the eigensolve is exact to rounding, LOBPCG runs to a residual of 1e-10)
        assert spectral_norm(w, exact_up_to=exact_up_to) == pytest.approx(exact, rel=1e-9)
    assert spectral_norm(torch.zeros(5, 3)) == 0.0


def test_spectrum_keeps_the_callers_thread_count(base_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    code, _, _ = _run(capsys, "spectrum", base_dir, "--out", tmp_path / "s.png", "--max-panels", "1", "--bins", "4")
    assert code == 0 and torch.get_num_threads() == threads


# ------------------------------------------------------------------------------------------------
# the entry point


@pytest.mark.slow
def test_help_answers_in_a_fresh_interpreter():
    # ``import hf_spectral`` registers with PEFT eagerly (so it imports peft and torch); the commands' own heavy
    # libraries (model loading, plotting) are still imported inside the commands only
    code = ("import sys; from hf_spectral.cli import main; main(['--help']); "
            "print('heavy:', sorted(m for m in ('matplotlib',) if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "inspect" in result.stdout and "spectrum" in result.stdout and "heavy: []" in result.stdout
