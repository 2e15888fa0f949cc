"""Test-wide settings and the fixtures every test file may use.

Always on: the spectral method is registered and known noisy warnings are quiet.

Fixtures (request them by name, or a whole file with ``pytestmark = pytest.mark.usefixtures("one_thread")``):

    one_thread   module scope: torch on one thread for the module's tests (two OpenMP threads on a busy
                 2-core machine stall each other, up to 10x slower steps; one is steady)
    offline_recipe_run
                 a recipe run as CI has it: no Hub (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), a compute-path cache in
                 the test's folder, transformers' logging at errors only
    shakespeare_data
                 session scope: the char-Shakespeare recipe's prepared data folder (train.bin, val.bin and
                 meta.json) from a small stand-in text (``ecosystem_utils.write_shakespeare_stand_in``), built
                 once; read-only for the tests, which write their runs elsewhere

Models: one factory per architecture in ``tiny_models.py`` (``make_mlp``, ``make_gpt2``, ``make_llama``,
``make_bert``; keyword arguments override config fields); there are no model fixtures, call the factory.

Markers: ``slow`` (registered in pyproject.toml) marks every test that starts a subprocess (torchrun,
``accelerate launch``, ``sys.executable``) or runs the HF Trainer or TRL's SFTTrainer. ``pytest -m "not slow"``
runs the rest in about a minute; plain ``pytest`` runs everything.

The scripts that tests launch (torchrun workers, training runs to kill and resume) live in ``workers/``; what
they share with the tests lives in ``tiny_models.py`` and ``ecosystem_utils.py`` (launching, the thread setting, token rows, per-rank results), which import without pytest.
"""

import warnings

import pytest
from ecosystem_utils import single_thread, write_shakespeare_stand_in

import hf_spectral  # noqa: F401  (registers the method)


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
        yield


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture
def offline_recipe_run(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_SPECTRAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory):
    from recipes.shakespeare_char import prepare

    root = tmp_path_factory.mktemp("shakespeare")
    prepare.prepare(str(write_shakespeare_stand_in(root)), root / "data")
    return root / "data"
