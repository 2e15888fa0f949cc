"""The spectral-mixing recipe: every arm's smoke run, its pinned loss trajectory, the table, the benchmark, Trainer."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, make_gpt2
from transformers import Trainer, TrainingArguments

from hf_spectral.mixing import SpectralMixingConfig, replace_attention
from recipes.spectral_mixing import bench, compare, throughput, train
from recipes.spectral_mixing.data import load

SMOKE = str(Path(__file__).resolve().parents[1] / "recipes" / "spectral_mixing" / "configs" / "smoke.yaml")

# the first six training losses of each smoke arm (seed 0), as measured when the recipe was written
PINNED = {
    "attention": [4.1845, 4.1297, 4.0684, 4.0029, 3.9681, 3.9348],
    "mixer": [4.1826, 4.1417, 4.0873, 4.0263, 3.9863, 3.9473],
    "mixer_spectral": [4.1781, 4.1436, 4.0915, 4.0429, 3.9919, 3.9542],
}


def test_data_is_nanogpt_split_of_tiny_shakespeare():
    data = load()
    assert data.vocab_size == 65
    assert len(data.train) == int(0.9 * (len(data.train) + len(data.val)))
    assert data.chars[data.train[0]] == "F"  # "First Citizen:"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --input"):
        load(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="dataset='penn'"):
        load(dataset="penn")
    with pytest.raises(ValueError, match="bpe_vocab=100: give 257-65535"):
        load(tokenizer="bpe", bpe_vocab=100)
    with pytest.raises(ValueError, match="tokenizer=.*no_such_tokenizer.* is neither"):
        load(tokenizer=str(tmp_path / "no_such_tokenizer"))
    with pytest.raises(ValueError, match=r"unknown settings \['n_layers'\]"):
        train.load_settings(SMOKE, "mixer", 0, ["n_layers=3"])
    with pytest.raises(ValueError, match="--arm 'lstm' is not in"):
        train.load_settings(SMOKE, "lstm", 0, [])


def test_bpe_data_renumbers_a_tokenizer_trained_on_the_training_text(tmp_path):
    chars = load()
    assert chars.tokens_per_word == pytest.approx(len(chars.val) / len(chars.val_text.split()))
    bpe = load(tokenizer="bpe", bpe_vocab=512)
    assert bpe.unit == "bpe" and bpe.vocab_size <= 512
    assert max(bpe.train.max(), bpe.val.max()) == bpe.vocab_size - 1  # renumbered: every id in use
    # the ids spell the text back (byte-level tokens: "Ġ" is a space, "Ċ" a newline)
    text = "".join(bpe.vocab[i] for i in bpe.train[:200]).replace("Ġ", " ").replace("Ċ", "\n")
    assert chars.train_text.startswith(text) and len(text) > 300
    assert 1.0 < bpe.tokens_per_word < chars.tokens_per_word  # a BPE token spans several characters
    assert bpe.word_perplexity(1.0) == pytest.approx(math.exp(bpe.tokens_per_word))
    with pytest.raises(AttributeError, match="read .vocab"):
        _ = bpe.chars


def test_a_pretrained_tokenizer_from_a_local_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from recipes.spectral_mixing.data import _train_bpe

    trained = _train_bpe(load().train_text, 400)
    PreTrainedTokenizerFast(tokenizer_object=trained).save_pretrained(tmp_path)
    from_folder = load(tokenizer=str(tmp_path))
    bpe = load(tokenizer="bpe", bpe_vocab=400)  # the same tokenizer, trained here
    assert from_folder.vocab == bpe.vocab and (from_folder.train == bpe.train).all()


def test_hub_datasets_are_read_by_column_and_a_failed_load_says_what_to_do(monkeypatch):
    import datasets

    fake = {"train": {"sentence": ["a b c", "d e"]}, "validation": {"sentence": ["b a", "c"]}}
    monkeypatch.setattr(datasets, "load_dataset", lambda *name: fake)
    ptb = load(dataset="ptb")
    assert ptb.train_text == "a b c\nd e" and ptb.tokens_per_word == pytest.approx(5 / 3)

    def offline(*name):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="wikitext.*could not be loaded.*input=PATH"):
        load(dataset="wikitext2")


@pytest.mark.parametrize("arm", ["attention", "mixer", "mixer_spectral"])
def test_smoke_run_writes_its_record_and_follows_the_pinned_losses(tmp_path, arm):
    result = train.main([SMOKE, "--arm", arm, f"runs_dir={tmp_path}", "threads=1"])
    record = json.loads((tmp_path / "smoke" / arm / "lr0.002" / "seed0" / "run.json").read_text())
    assert record["val_loss"] == result["val_loss"] and math.isfinite(record["val_loss"])
    assert record["val_loss"] < math.log(65)
    losses = [loss for _, loss in record["train_curve"]]
    assert losses == pytest.approx(PINNED[arm], abs=3e-3)
    assert record["parameters"]["total"] > 0 and record["tokens"] == 6 * 4 * 32
    assert [tokens for tokens, _, _ in record["val_curve"]] == [3 * 4 * 32, 6 * 4 * 32]
    seconds = [s for _, _, s in record["val_curve"]]
    assert 0 <= seconds[0] <= seconds[1] <= record["train_seconds"] + 0.1  # training time so far, rounded to 0.1 s
    assert record["best_val_loss"] == min(v for _, v, _ in record["val_curve"])
    assert record["val_word_perplexity"] == pytest.approx(math.exp(record["val_loss"] * record["tokens_per_word"]), rel=1e-3)


def test_the_llama_family_gives_both_arms_rotary_llama_blocks_at_matched_size(tmp_path):
    built = {}
    for arm in ("attention", "mixer"):
        settings = train.load_settings(SMOKE, arm, 0, ["family=llama"])
        built[arm] = train.build_model(settings, VOCAB)
    assert type(built["attention"]).__name__ == "LlamaForCausalLM"
    assert type(built["mixer"]).__name__ == "SpectralMixingLlamaForCausalLM"
    assert built["attention"].config.tie_word_embeddings and built["attention"].config.intermediate_size == 80
    counts = {arm: sum(p.numel() for p in model.parameters()) for arm, model in built.items()}
    assert abs(counts["mixer"] - counts["attention"]) < 0.01 * counts["attention"]
    result = train.main([SMOKE, "--arm", "mixer", f"runs_dir={tmp_path}", "threads=1", "family=llama"])
    assert result["settings"]["family"] == "llama" and result["val_loss"] < math.log(VOCAB)
    with pytest.raises(ValueError, match="family='mamba' is not one of"):
        train.load_settings(SMOKE, "mixer", 0, ["family=mamba"])


def test_a_bpe_run_records_its_unit_and_word_perplexity(tmp_path):
    result = train.main([SMOKE, "--arm", "mixer", f"runs_dir={tmp_path}", "threads=1", "tokenizer=bpe", "bpe_vocab=300"])
    assert result["unit"] == "bpe" and 65 < result["vocab_size"] <= 300  # the ids in use: more than the characters
    assert math.isfinite(result["val_word_perplexity"]) and result["val_loss"] < math.log(result["vocab_size"]) + 0.5


def test_compare_picks_each_arms_best_rate_and_reads_at_equal_tokens_and_time(tmp_path):
    for arm in ("mixer", "attention"):
        for lr in (2e-3, 1e-2):
            train.main([SMOKE, "--arm", arm, f"runs_dir={tmp_path}", "threads=1", "max_steps=2", "eval_every=1",
                        f"learning_rate={lr}"])
    runs = compare.collect([str(tmp_path / "smoke")])
    table = compare.rows(runs)
    assert [(r["arm"], r["learning_rate"]) for r in table] == [
        ("attention", 2e-3), ("attention", 1e-2), ("mixer", 2e-3), ("mixer", 1e-2)]
    for arm in ("attention", "mixer"):
        mine = [r for r in table if r["arm"] == arm]
        assert [r["best_lr"] for r in mine].count(True) == 1
        assert next(r for r in mine if r["best_lr"])["best_val_loss"] == min(r["best_val_loss"] for r in mine)
    attention = next(r for r in table if r["arm"] == "attention" and r["best_lr"])
    mixer = next(r for r in table if r["arm"] == "mixer" and r["best_lr"])
    assert mixer["vs_attention"] == pytest.approx(mixer["val_loss"] - attention["val_loss"])
    assert f"| 32 | mixer | 31 | {mixer['learning_rate']:g} (best) |" in compare.markdown(table)
    tokens = compare.equal_tokens(runs, table)
    assert [(r["arm"], r["tokens"]) for r in tokens] == [("attention", 128), ("attention", 256), ("mixer", 128), ("mixer", 256)]
    timed = compare.equal_time(runs, table)
    assert timed[0]["train_seconds"] == timed[1]["train_seconds"] == min(attention["train_seconds"], mixer["train_seconds"])


def _record(arm, lr, seed, loss):
    return {"settings": {"block_size": 32, "arm": arm, "learning_rate": lr, "seed": seed}, "val_loss": loss,
            "best_val_loss": loss, "val_curve": [[128, loss, 1.0]], "parameters": {"total": 10, "mixing": 5},
            "n_atoms": None, "tokens": 128, "tokens_per_second": 1.0, "train_seconds": 1.0}


def test_the_rate_is_chosen_on_the_first_seed_and_seeds_are_paired():
    runs = [_record("attention", 1e-3, 0, 2.0), _record("attention", 1e-3, 1, 2.2), _record("attention", 1e-3, 2, 2.4),
            _record("attention", 4e-3, 0, 2.1),  # worse on seed 0, better than the 3-seed mean: not chosen
            _record("mixer", 1e-3, 0, 1.9), _record("mixer", 1e-3, 1, 2.3), _record("mixer", 1e-3, 2, 2.3)]
    table = compare.rows(runs)
    assert [r["learning_rate"] for r in table if r["best_lr"]] == [1e-3, 1e-3]
    (pair,) = compare.paired(runs, table)
    assert pair["seeds"] == 3 and pair["mean"] == pytest.approx((-0.1 + 0.1 - 0.1) / 3)
    assert pair["std"] == pytest.approx(statistics.stdev([-0.1, 0.1, -0.1]))
    assert "| 32 | mixer | 3 | -0.033 |" in compare.paired_markdown([pair])


def test_interpolation_along_the_validation_curve_in_seconds():
    curve = [[100, 3.0, 10.0], [200, 2.0, 20.0], [300, 1.5, 40.0]]
    assert compare.interpolate(curve, 15.0) == pytest.approx(2.5)
    assert compare.interpolate(curve, 30.0) == pytest.approx(1.75)
    assert compare.interpolate(curve, 5.0) is None  # before the first evaluation: no reading
    assert compare.interpolate(curve, 50.0) == 1.5


def test_sweep_plans_every_arm_at_every_rate_seed_major(tmp_path):
    from recipes.spectral_mixing import sweep

    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nseeds: [0, 1]\nlearning_rates: [0.001, 0.002]\narms: [{arm: attention}, {arm: mixer}]\n")
    plan = sweep.plan(str(profile))
    assert plan[:4] == [("attention", 0.001, 0), ("mixer", 0.001, 0), ("attention", 0.002, 0), ("mixer", 0.002, 0)]
    assert len(plan) == 8 and sweep.plan(str(profile), seeds=[2], learning_rates=[0.01]) == [
        ("attention", 0.01, 2), ("mixer", 0.01, 2)]


def test_bench_summary_fits_slopes_and_finds_the_crossover():
    assert bench.slope([1024, 2048, 4096], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert bench.slope([1024, 2048], [1.0, 4.0]) == pytest.approx(2.0)
    assert bench.crossover([1024, 2048, 4096], [1.0, 4.0, 16.0], [2.0, 4.0, 8.0]) == pytest.approx(2048)
    assert bench.crossover([1024, 2048], [1.0, 2.0], [2.0, 4.0]) is None


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path):
    results = bench.main(["--lengths", "64", "128", "--contexts", "64", "128", "--out", str(tmp_path)])
    assert (tmp_path / "bench.png").is_file()
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["train"]) == {"attention", "mixer"} and saved["summary"] == results["summary"]


def test_throughput_alternates_the_fair_profiles_arms_at_equal_tokens_and_records_each_step(tmp_path):
    out = tmp_path / "throughput.json"
    results = throughput.main(["--contexts", "32", "64", "--tokens", "128", "--repeats", "2", "--threads", "1",
                               "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    for row, context in zip(results["rows"], (32, 64), strict=True):
        assert (row["context"], row["batch"], row["tokens"], row["threads"]) == (context, 128 // context, 128, 1)
        assert all(len(row["seconds"][arm]) == 2 for arm in throughput.ARMS)
        assert row["mixer_throughput_vs_attention"] == pytest.approx(
            statistics.median(row["seconds"]["attention"]) / statistics.median(row["seconds"]["mixer"]))
    step = throughput.step_function("mixer", 32, 2)
    step()  # the mixer arm is the fair profile's: its attention is replaced
    assert any(getattr(m, "is_spectral_mixer", False) for m in step.model.modules())


@pytest.mark.slow
def test_trainer_trains_a_mixer_model(tmp_path):
    model = replace_attention(make_gpt2(), SpectralMixingConfig(reconstruction_weight=0.1)).train()
    ids = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                             report_to="none", logging_steps=4, save_strategy="no", use_cpu=True)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.save_pretrained(tmp_path / "saved")
    assert "spectral_mixing" in json.loads((tmp_path / "saved" / "config.json").read_text())
