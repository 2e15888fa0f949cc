"""recipes/shakespeare_char: the smoke profile end to end (train every kind of arm, resume, compare)."""

import json
from pathlib import Path

import pytest
import torch
from hf_spectral.ecosystem.checkpoints import MANIFEST_NAME

from recipes.shakespeare_char import compare, prepare, sweep, train

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "shakespeare_char" / "configs" / "smoke.yaml"
PROFILES = sorted((REPO / "recipes" / "shakespeare_char" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two OpenMP threads on a busy 2-core machine stall each other (10x slower steps); one is steady
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small stand-in for tiny Shakespeare: hermetic, no network."""
    root = tmp_path_factory.mktemp("shakespeare")
    lines = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak.", ""]
    text = "\n".join(lines * 120) + "\nABCDEFGHIJKLMNOPQRSTUVWXYZ!?;&'$-3.,:\n"
    (root / "input.txt").write_text(text)
    prepare.prepare(str(root / "input.txt"), root / "data")
    return root / "data"


def run(data_dir, tmp_path, arm, *overrides):
    profile = train.load_profile(SMOKE)
    settings = train.run_settings(profile, arm, 0, [f"data_dir={data_dir}", f"runs_dir={tmp_path}", *overrides])
    return train.train(settings)


def test_prepare_follows_nanogpt(data_dir):
    meta = prepare.load_meta(data_dir)
    train_ids, val_ids = prepare.load_split(data_dir, "train"), prepare.load_split(data_dir, "val")
    assert meta["chars"] == "".join(sorted(meta["chars"]))
    assert len(train_ids) == int(0.9 * (len(train_ids) + len(val_ids)))
    assert meta["vocab_size"] == len(meta["chars"]) and max(train_ids.max(), val_ids.max()) < meta["vocab_size"]


def test_validation_windows_score_every_character_once():
    tokens = torch.arange(1000).numpy()
    windows = train.validation_windows(tokens, 32)
    predicted = windows[:, 1:].reshape(-1)
    assert torch.equal(predicted, torch.arange(1, 1 + predicted.numel()))
    assert len(tokens) - 1 - predicted.numel() < 31


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["dense", "random_mn10_wadam", "lowrank_mn2"])
def test_smoke_arm_trains_and_writes_its_record(data_dir, tmp_path, arm):
    result = run(data_dir, tmp_path, arm)
    saved = json.loads((tmp_path / "smoke" / arm / "seed0" / "run.json").read_text())
    assert saved["finished"] and saved["steps"] == 4 and saved["tokens"] == 4 * 4 * 32
    assert [t for t, _ in saved["curves"]["val"]] == [256, 512]
    assert saved["final_val_loss"] < saved["curves"]["train"][0][1]  # it learned something
    assert set(saved["stable_rank"]) == {"h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"}
    assert saved["checkpoint_bytes"] > 0 and len(saved["sample"]) == 40
    share = saved["params"]["block_share"]
    assert share == 1.0 if arm == "dense" else abs(share - result["fraction"]) < 0.01


@pytest.mark.slow
def test_spectral_run_saves_a_restorable_adapter_and_resumes(data_dir, tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    # a run stopped after its first checkpoint resumes to the same result as one straight run
    straight = run(data_dir, tmp_path / "a", "lowfreq_mn2_adamw", "eval_windows=4")
    first = run(
        data_dir,
        tmp_path / "b",
        "lowfreq_mn2_adamw",
        "eval_windows=4",
        "save_strategy=steps",
        "save_steps=2",
        "time_limit_minutes=0",
    )
    assert first is None
    partial = json.loads((tmp_path / "b" / "smoke" / "lowfreq_mn2_adamw" / "seed0" / "run.json").read_text())
    assert not partial["finished"] and partial["steps"] == 1 and partial["curves"]["val"][-1][0] == partial["tokens"]
    # the checkpoint it resumes from was marked complete (a kill during a save leaves one that is not)
    checkpoints = list((tmp_path / "b" / "smoke" / "lowfreq_mn2_adamw" / "seed0").glob("checkpoint-*"))
    assert checkpoints and all((c / MANIFEST_NAME).is_file() for c in checkpoints)
    resumed = run(
        data_dir, tmp_path / "b", "lowfreq_mn2_adamw", "eval_windows=4", "save_strategy=steps", "save_steps=2"
    )
    assert resumed["final_val_loss"] == pytest.approx(straight["final_val_loss"], abs=1e-5)

    model_dir = tmp_path / "a" / "smoke" / "lowfreq_mn2_adamw" / "seed0" / "model"
    _, model_args, _, _ = train.parse_settings(straight["settings"])
    vocab = prepare.load_meta(data_dir)["vocab_size"]
    # as the README reloads it: the architecture from the config.json saved beside the weights
    config = GPT2Config.from_pretrained(model_dir)
    expected = train.gpt2_config(model_args, vocab)
    fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "tie_word_embeddings")
    assert {f: getattr(config, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    restored = PeftModel.from_pretrained(GPT2LMHeadModel(config), str(model_dir))
    val = prepare.load_split(data_dir, "val")
    windows = train.validation_windows(val, 32, 4)
    assert train.validation_loss(restored, windows, 64, "cpu") == pytest.approx(straight["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_sweep_and_compare_write_table_plots_and_samples(data_dir, tmp_path):
    settings = ["--set", f"data_dir={data_dir}", f"runs_dir={tmp_path}"]
    sweep.main([str(SMOKE), "--arms", "dense,lowrank_mn2", *settings, "--no-compare", "--in-process"])
    text = compare.compare(tmp_path / "smoke")
    assert "| dense |" in text and "| lowrank_mn2 |" in text and "± 0.000" in text
    for name in ("table.md", "samples.md", "val_loss.png", "stable_rank.png"):
        assert (tmp_path / "smoke" / name).stat().st_size > 0


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_parses_into_the_dataclasses(path):
    profile = train.load_profile(path)
    for seed in profile.get("seeds", [0]):
        for arm in profile["arms"]:
            if seed in arm.get("seeds", profile.get("seeds", [0])):
                train.parse_settings(train.run_settings(profile, arm["arm"], seed))


def test_a_mistyped_setting_fails_loudly():
    profile = train.load_profile(SMOKE)
    with pytest.raises(ValueError, match="learning_rat"):
        train.parse_settings(train.run_settings(profile, "dense", 0, ["learning_rat=1"]))
    with pytest.raises(ValueError, match="not in profile"):
        train.run_settings(profile, "no_such_arm", 0)


def test_offline_without_a_shared_copy_the_shipped_text_is_used(tmp_path, monkeypatch):
    """A fresh clone on a machine with no network and no ../shared: prepare never touches the network."""

    def no_network(*args, **kwargs):
        raise AssertionError("prepare went to the network although the shipped copy is there")

    monkeypatch.setenv("HF_SPECTRAL_SHARED", str(tmp_path / "no_shared_folder"))
    monkeypatch.setattr(prepare.urllib.request, "urlopen", no_network)
    assert not prepare.shared_copy().exists()
    meta = prepare.prepare(None, tmp_path / "data")
    assert meta["sha256"] == prepare.SHA256 and "shipped" in meta["source"]
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)


def test_the_shared_copy_comes_first_and_a_damaged_shipped_copy_falls_back_to_the_download(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data" / "tinyshakespeare"
    shared.mkdir(parents=True)
    (shared / "input.txt").write_text("To be, or not to be\n")
    monkeypatch.setenv("HF_SPECTRAL_SHARED", str(tmp_path / "shared"))
    assert prepare.read_text(None) == ("To be, or not to be\n", str(shared / "input.txt"))

    import bz2

    monkeypatch.setenv("HF_SPECTRAL_SHARED", str(tmp_path / "missing"))
    monkeypatch.setattr(prepare, "SHIPPED_COPY", tmp_path / "input.txt.bz2")
    (tmp_path / "input.txt.bz2").write_bytes(bz2.compress(b"not the canonical text"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="missing or damaged .* could not be downloaded .* --input"):
        prepare.read_text(None)


@pytest.mark.slow
def test_main_job_shows_bars_and_the_table_not_log_dicts(data_dir, tmp_path, capfd):
    from recipes.shakespeare_char import main_job

    tiny = ["n_layer=1", "block_size=32", "max_steps=2", "eval_steps=1", "logging_steps=1", "eval_windows=4"]
    tiny += ["per_device_train_batch_size=4", "sample_chars=10", "use_cpu=true"]
    main_job.main(["--input", str(data_dir.parent / "input.txt"), "--out", str(tmp_path), "--set", *tiny])
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err
    for arm in ("dense", "lowfreq_mn2_wadam", "lowrank_mn2"):
        assert f"{arm}: 100%" in err  # one progress bar per arm
        assert f"| {arm} |" in out
        record = json.loads((tmp_path / "main_job" / arm / "seed0" / "run.json").read_text())
        assert len(record["curves"]["train"]) == 2 and len(record["curves"]["val"]) == 2  # the logs are kept
    assert "main job:" in out
