"""recipes/common: the one override parser, profiles, run records, the hardware line, stable rank, the progress bar."""

import argparse
import math
import types
from pathlib import Path

import pytest
import torch

import recipes.common as common
from recipes.common import (
    arm_settings,
    check_optimizer,
    hardware,
    hardware_line,
    is_finished,
    load_profile,
    markdown_table,
    mean_std,
    parse_args_with_overrides,
    parse_overrides,
    parse_value,
    read_record,
    stable_rank,
    write_record,
)

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(
    p for recipe in ("shakespeare_char", "finetune") for p in (REPO / "recipes" / recipe / "configs").glob("*.yaml")
)


# --------------------------------------------------------------------------------------------------
# the override parser


@pytest.mark.parametrize(
    "text, value",
    [
        ("no", "no"),  # save_strategy=no: the word TrainingArguments expects, not False
        ("yes", "yes"),
        ("off", "off"),
        ("On", "On"),
        ("true", True),
        ("False", False),
        ("TRUE", True),
        ("100", 100),
        ("-3", -3),
        ("2.0e-3", 0.002),
        ("1e-3", 0.001),  # YAML 1.1 reads this as a string
        ("3E5", 300000.0),
        ("0.5", 0.5),
        ("null", None),
        ("", None),
        ("[1, 2]", [1, 2]),
        ("{min_lr_rate: 0.1}", {"min_lr_rate": 0.1}),
        ("runs/shakespeare_char", "runs/shakespeare_char"),
        ("cosine_with_min_lr", "cosine_with_min_lr"),
        ("'007'", "007"),
    ],
)
def test_parse_value_pins_the_override_rules(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_overrides_splits_at_the_first_equals_and_later_wins():
    assert parse_overrides(["save_strategy=no", "max_steps=4", "name=a=b", "max_steps=8"]) == {
        "save_strategy": "no",
        "max_steps": 8,
        "name": "a=b",
    }
    assert parse_overrides(None) == {} and parse_overrides([]) == {}
    for bad in ("max_steps", "=4"):
        with pytest.raises(ValueError, match="must look like key=value"):
            parse_overrides([bad])


def test_both_recipes_read_overrides_with_the_one_parser():
    from recipes.finetune import train as finetune_train
    from recipes.shakespeare_char import train as shakespeare_train

    profile = shakespeare_train.load_profile(REPO / "recipes" / "shakespeare_char" / "configs" / "smoke.yaml")
    settings = shakespeare_train.run_settings(profile, "dense", 0, ["save_strategy=no", "learning_rate=1e-3"])
    assert settings["save_strategy"] == "no" and settings["learning_rate"] == 0.001
    _, _, _, args = shakespeare_train.parse_settings(settings)
    assert args.save_strategy == "no" and args.learning_rate == 0.001

    overrides = finetune_train.parse_overrides(["save_strategy=no", "head_lr=1e-3"])
    assert overrides == {"save_strategy": "no", "head_lr": 0.001}


# --------------------------------------------------------------------------------------------------
# profiles


def test_profiles_read_no_as_a_word_and_default_their_name(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("defaults: {save_strategy: no, lr: 1e-3, keep: true}\narms:\n  - {arm: a, kind: dense}\n")
    profile = load_profile(path)
    assert profile["name"] == "tiny"
    assert profile["defaults"] == {"save_strategy": "no", "lr": 0.001, "keep": True}
    settings = arm_settings(profile, "a")
    assert settings == {
        "save_strategy": "no",
        "lr": 0.001,
        "keep": True,
        "arm": "a",
        "kind": "dense",
        "profile": "tiny",
    }
    settings["lr"] = 1.0
    assert profile["defaults"]["lr"] == 0.001  # a copy: a run's changes do not leak into the profile
    with pytest.raises(ValueError, match=r"arm 'b' is not in profile 'tiny'; choose from \['a'\]"):
        arm_settings(profile, "b")


def test_a_file_without_arms_is_not_a_profile(tmp_path):
    (tmp_path / "x.yaml").write_text("defaults: {a: 1}\n")
    with pytest.raises(ValueError, match="needs `defaults:` and a list of `arms:`"):
        load_profile(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("arms:\n  - {kind: dense}\n")
    with pytest.raises(ValueError, match="have no `arm:` name"):
        load_profile(tmp_path / "y.yaml")


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_every_recipe_profile_reads_as_plain_yaml_does(path):
    """The recipe rules only change unquoted no/yes/on/off and 1e-3-style numbers: no profile has one."""
    import yaml

    plain = yaml.safe_load(path.read_text())
    profile = load_profile(path)
    assert profile["arms"] == plain["arms"] and profile["defaults"] == plain.get("defaults", {})


# --------------------------------------------------------------------------------------------------
# records


def test_records_are_written_whole_and_finished_unless_they_say_not(tmp_path):
    assert read_record(tmp_path / "run") is None and not is_finished(tmp_path / "run")
    path = write_record(tmp_path / "run", {"arm": "a", "finished": False, "path": Path("x")})
    assert path == tmp_path / "run" / "run.json" and not (tmp_path / "run" / "run.json.partial").exists()
    assert read_record(tmp_path / "run") == {"arm": "a", "finished": False, "path": "x"}
    assert not is_finished(tmp_path / "run")
    write_record(tmp_path / "run", {"arm": "a", "finished": True})
    assert is_finished(tmp_path / "run") and is_finished(tmp_path / "run" / "run.json")
    write_record(tmp_path / "other", {"arm": "b"})  # a record without the flag is a finished run
    assert is_finished(tmp_path / "other")
    assert [r["arm"] for _, r in common.find_records(tmp_path)] == ["b", "a"]


# --------------------------------------------------------------------------------------------------
# hardware, stable rank, optimiser names, tables


def test_hardware_records_the_device_and_versions_and_reads_as_one_line():
    import peft
    import transformers

    info = hardware("cpu")
    assert info["device"] == "cpu" and info["name"] == info["cpu"] and info["world_size"] == 1
    assert info["torch"] == torch.__version__ and info["peft"] == peft.__version__
    line = hardware_line(info)
    assert line.startswith(f"{info['name']} (cpu), torch {torch.__version__}, transformers {transformers.__version__}")
    gpu = {"device": "cuda", "name": "NVIDIA H100", "world_size": 2, "torch": "2.13.0"}
    assert hardware_line(gpu) == "NVIDIA H100 (cuda, 2 processes), torch 2.13.0"
    gpu.update(cpu="AMD EPYC 9454 (16 cores)", world_size=1)
    assert hardware_line(gpu) == "NVIDIA H100 (cuda; AMD EPYC 9454 (16 cores)), torch 2.13.0"
    # older fine-tuning records kept the GPU's name, or "cpu", under device and the core count apart
    old = {"device": "NVIDIA H100", "cpu": "x86_64", "cpu_count": 16, "torch": "2.9"}
    assert hardware_line(old) == "NVIDIA H100 (cuda; x86_64, 16 CPUs), torch 2.9"
    assert hardware_line({**old, "device": "cpu"}) == "x86_64, 16 CPUs (cpu), torch 2.9"


def test_stable_rank_is_frobenius_over_spectral_norm_squared():
    torch.manual_seed(0)
    for shape in ((64, 16), (16, 64), (32, 32)):
        weight = torch.randn(*shape)
        sigma = torch.linalg.svdvals(weight.double())
        expected = float((sigma**2).sum() / sigma[0] ** 2)
        assert stable_rank(weight) == pytest.approx(expected, rel=1e-5)
        assert stable_rank(weight.double()) == pytest.approx(expected, rel=1e-10)
    assert stable_rank(torch.outer(torch.randn(20), torch.randn(30))) == pytest.approx(1.0)
    assert stable_rank(torch.eye(12)) == pytest.approx(12.0)
    assert stable_rank(torch.zeros(5, 7)) == 0.0


def test_optimizer_names_and_their_rule():
    assert check_optimizer("adamw", spectral=False) is None
    assert check_optimizer("wadam", spectral=True) == "weight"
    assert check_optimizer("wfactored", spectral=True) == "factored"
    with pytest.raises(ValueError, match=r"optimizer='wadam' is for spectral arms only, not kind='dense'"):
        check_optimizer("wadam", spectral=False, arm="kind='dense'")
    with pytest.raises(ValueError, match="is not one of"):
        check_optimizer("sgd", spectral=True)


def test_mean_std_and_markdown_table():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = mean_std([2.0, float("nan"), None])
    assert mean == 2.0 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([]))
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_every_export_is_the_function_not_a_submodule():
    for name in common.__all__:
        assert not isinstance(getattr(common, name), types.ModuleType), name


# --------------------------------------------------------------------------------------------------
# the progress bar


@pytest.mark.slow
def test_quiet_trainer_prints_no_log_dicts_and_shows_one_bar(tmp_path, capsys):
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from recipes.common import ProgressBar, quiet

    model = torch.nn.Linear(4, 1)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.full((4,), float(i)), "y": torch.tensor([1.0])}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, y):
            return {"loss": torch.nn.functional.mse_loss(self.inner(x), y)}

    for disable in (True, False):
        args = TrainingArguments(
            output_dir=str(tmp_path / str(disable)),
            max_steps=3,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=disable,
            remove_unused_columns=False,
        )
        trainer = quiet(Trainer(model=Wrapped(), args=args, train_dataset=Data()), label="arm")
        kinds = {type(c) for c in trainer.callback_handler.callbacks}
        assert PrinterCallback not in kinds and ProgressCallback not in kinds
        assert (ProgressBar in kinds) is not disable
        trainer.train()
        out = capsys.readouterr()
        assert "{'loss'" not in out.out + out.err and "'train_runtime'" not in out.out + out.err
        assert ("arm: 100%" in out.err) is not disable
        assert len([e for e in trainer.state.log_history if "loss" in e]) == 3  # the logs are still kept


def test_overrides_after_an_option_of_many_values_stay_overrides(monkeypatch):
    """``--learning-rates 8e-3 4e-3 max_steps=1500`` once failed: argparse handed max_steps=1500 to the option."""
    from recipes.spectral_mixing import sweep

    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("--learning-rates", type=float, nargs="*")
    parser.add_argument("--arms", nargs="*")
    parser.add_argument("overrides", nargs="*")
    for argv in (
        ["p.yaml", "--learning-rates", "8e-3", "4e-3", "max_steps=1500", "--arms", "mixer", "runs_dir=r"],
        ["p.yaml", "max_steps=1500", "runs_dir=r", "--arms", "mixer", "--learning-rates", "8e-3", "4e-3"],
        ["max_steps=1500", "p.yaml", "--arms", "mixer", "runs_dir=r", "--learning-rates", "8e-3", "4e-3"],
    ):
        args = parse_args_with_overrides(parser, argv)
        assert args.profile == "p.yaml" and args.arms == ["mixer"] and args.learning_rates == [8e-3, 4e-3]
        assert args.overrides == ["max_steps=1500", "runs_dir=r"]
    with pytest.raises(SystemExit):  # an unknown option is an error, not an override
        parse_args_with_overrides(parser, ["p.yaml", "--max-steps", "3"])
    # the mixer sweep hands both the rates and the overrides to every run
    started = []
    monkeypatch.setattr(sweep, "run", started.append)
    profile = str(REPO / "recipes" / "spectral_mixing" / "configs" / "fair.yaml")
    sweep.main([profile, "--seeds", "1", "--arms", "mixer", "--learning-rates", "8e-3", "4e-3", "max_steps=1500"])
    assert [(s.arm, s.learning_rate, s.seed, s.max_steps) for s in started] == [
        ("mixer", 8e-3, 1, 1500),
        ("mixer", 4e-3, 1, 1500),
    ]
