"""The method comparison (recipes/method_comparison, run by recipes/finetune): the generative exact-match task, the
measures PEFT's comparison records (adapter file size, peak memory, forgetting), the gradient layout's calibration,
the paired difference to LoRA, and every profile parsing. Offline: a tiny Llama, a character tokenizer and a
synthetic Rotten Tomatoes csv built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipes.finetune import compare, generative, measures, sweep, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "method_comparison" / "configs"
METHODS = {"spectral", "lora", "fourierft", "waveft", "vera", "c3a", "full"}


pytestmark = pytest.mark.usefixtures("one_thread", "offline_recipe_run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with a character tokenizer that decodes back to text, a Rotten-Tomatoes-shaped csv (movies
    spread over the split buckets) and a general text file."""
    import pandas as pd
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_compare")
    fresh = ["a warm and funny film", "great fun all the way", "moving and wise"]
    rotten = ["a dull mess", "boring and long", "flat jokes and no heart"]
    rows = []
    for movie in range(120):
        rows.append({"movie_name": f"movie {movie}", "category": "fresh", "text": fresh[movie % 3]})
        rows.append({"movie_name": f"movie {movie}", "category": "rotten", "text": rotten[movie % 3]})
    pd.DataFrame(rows).to_csv(root / "reviews.csv", index=False)
    (root / "general.txt").write_text("Before we proceed any further, hear me speak.\n" * 40)
    chars = sorted(set("".join(fresh + rotten)) | set("Review:Sentiment\nfreshrotBwpcdyuhk,.") | {" "})
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def _overrides(tiny: Path, runs_dir: Path) -> list[str]:
    return [f"runs_dir={runs_dir}", f"model={tiny / 'model'}", f"data={tiny / 'reviews.csv'}",
            f"forgetting_data={tiny / 'general.txt'}"]


# --------------------------------------------------------------------------------------------------
# pieces


def test_every_comparison_profile_parses_and_names_known_methods():
    profiles = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"cls_compare", "lm_compare", "gen_compare", "gen_smoke"}
    for path in profiles:
        profile = train.load_profile(str(path))
        for arm in profile["arms"]:
            recipe, _ = train.parse_settings(train.arm_settings(profile, arm["arm"]), arm["lrs"][0], 0)
            assert recipe.method in METHODS
        if path.stem.endswith("_compare"):  # the full profiles hold every arm of the comparison
            names = {arm["arm"] for arm in profile["arms"]}
            assert {"lora_r1", "lora_r8", "lora_r32", "full", "vera_r256", "c3a_b64"} <= names
            assert {f"spectral_{layout}_k{k}" for layout in ("random", "lowfreq", "banded", "gradient")
                    for k in (1000, 5000)} <= names


def test_first_word_reads_the_answer():
    assert generative.first_word(" Fresh.\nReview") == "fresh"
    assert generative.first_word("   ") == ""


def test_exact_match_in_batches_equals_one_prompt_at_a_time(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    data = generative.gen_data(str(tiny / "reviews.csv"), tokenizer, 16, 8, lambda n: list(range(min(n, 6))))
    test = data["test"]
    # make some answers right: label each prompt with what the model itself says one prompt at a time
    said = []
    for prompt in test.prompts:
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        said.append(generative.first_word(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)))
    words = [generative.first_word(a) for a in generative.ANSWERS]
    expected = sum(s == words[label] for s, label in zip(said, test.labels, strict=True)) / len(test)
    # padding on the left must not change what a prompt generates
    assert generative.exact_match(model, tokenizer, test, batch_size=4) == pytest.approx(expected)
    # training labels cover the answer only
    item = data["train"][0]
    assert item["labels"][: len(data["train"].prompts[0])] == [-100] * len(data["train"].prompts[0])
    assert tokenizer.decode(item["input_ids"][len(data["train"].prompts[0]):], skip_special_tokens=True) in (
        " fresh", " rotten")


def test_paired_difference_is_per_seed():
    arm = {"by_seed": {0: 0.80, 1: 0.70, 2: 0.75}}
    lora = {"by_seed": {0: 0.78, 1: 0.71, 3: 0.9}}
    mean, std, count = compare.paired_difference(arm, lora, sign=1)
    assert count == 2 and mean == pytest.approx(0.005) and std == pytest.approx(math.sqrt(2) * 0.015)
    mean, _, _ = compare.paired_difference(arm, lora, sign=-1)  # perplexity: lower is better
    assert mean == pytest.approx(-0.005)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_generative_comparison_smoke_profile_end_to_end(tiny, tmp_path):
    sweep.main([str(CONFIGS / "gen_smoke.yaml"), *_overrides(tiny, tmp_path)])
    records = [json.loads(p.read_text()) for p in (tmp_path / "gen_smoke").rglob("run.json")]
    assert not list((tmp_path / "gen_smoke").rglob("error.json"))
    by_arm = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record)
    assert {r["method"] for r in records} == METHODS and all(len(v) == 2 for v in by_arm.values())
    for record in records:
        for split in ("validation", "test"):
            assert 0.0 <= record["results"][split]["exact_match"] <= 1.0
        assert record["adapter_file_bytes"] > 0 and record["max_rss_mb"] > 0
        forgetting = record["forgetting"]
        assert forgetting["change"] == pytest.approx(forgetting["after"] - forgetting["before"])
        assert (record["calibration_seconds"] is not None) == (record["recipe"]["layout"] == "gradient"
                                                                and record["method"] == "spectral")
    # the base model's loss is the same whatever the arm (FourierFT's non-zero init is disabled for it)
    befores = {round(r["forgetting"]["before"], 5) for r in records}
    assert len(befores) == 1
    lora = by_arm["lora_r8"][0]
    full = by_arm["full"][0]
    assert full["adapter_file_bytes"] >= 4 * full["parameters"]["base_model"]  # every float32 weight, once
    assert 4 * lora["parameters"]["trainable_adapter"] <= lora["adapter_file_bytes"] < full["adapter_file_bytes"]
    # a global budget moves coefficients between layers but keeps their total
    spectral = by_arm["spectral_gradient_k1000"][0]["parameters"]["trainable_adapter"]
    assert by_arm["spectral_gradient_global_k1000"][0]["parameters"]["trainable_adapter"] == spectral

    text = compare.main([str(tmp_path / "gen_smoke")])
    assert "test exact_match (%)" in text and "paired Δ test exact_match" in text
    assert "| spectral_gradient_k1000 |" in text and "(n=2)" in text
    summary = json.loads((tmp_path / "gen_smoke" / "summary.json").read_text())
    assert summary["spectral_gradient_k1000"]["calibration_seconds"] > 0


@pytest.mark.slow
def test_lm_task_records_forgetting_and_calibrates(tiny, tmp_path):
    settings = train.arm_settings(train.load_profile(str(CONFIGS / "gen_smoke.yaml")), "spectral_gradient_k1000")
    settings.update(task="lm", data=str(tiny / "general.txt"), model=str(tiny / "model"), runs_dir=str(tmp_path),
                    forgetting_data=str(tiny / "reviews.csv"), max_train_examples=8, diagnostics=False)
    record = train.run(settings, 1e-3, 0)
    assert record["forgetting"]["before"] > 0 and record["calibration_seconds"] > 0
    assert 1.0 < record["results"]["test"]["perplexity"] < 1e4


def test_general_blocks_refuse_a_short_text(tiny, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "short.txt").write_text("hi")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    with pytest.raises(ValueError, match="fewer than 32 tokens"):
        measures.general_blocks(str(tmp_path / "short.txt"), tokenizer, 32, 4)
    with pytest.raises(FileNotFoundError, match="forgetting_data=.*missing.txt"):
        measures.general_blocks(str(tmp_path / "missing.txt"), tokenizer, 32, 4)
    blocks = measures.general_blocks(str(tiny / "reviews.csv"), tokenizer, 8, 3)
    assert blocks.shape == (3, 8)


def test_peak_rss_sees_memory_held_during_the_run():
    memory = measures.PeakRSS().start()
    start = memory.peak
    held = torch.ones(25_000_000)  # 100 MB, touched
    held.add_(1)
    import time

    time.sleep(0.1)
    del held
    peak = memory.stop()
    if start:  # Linux: sampled from /proc
        assert peak * 2**20 - start > 80e6


@pytest.mark.slow
def test_fresh_process_runs_each_run_alone(tiny, tmp_path):
    sweep.main([str(CONFIGS / "gen_smoke.yaml"), "--arms", "lora_r8", "--fresh_process",
                *_overrides(tiny, tmp_path)])
    records = [json.loads(p.read_text()) for p in (tmp_path / "gen_smoke").rglob("run.json")]
    assert len(records) == 2 and len({r["process_id"] for r in records}) == 2  # the two seeds
    assert all(r["peak_rss_run_mb"] > 0 for r in records)
