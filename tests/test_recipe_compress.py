"""The compression recipe on a tiny Llama built from a config: storage in bytes, the compressors, healing, compare."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralLayer
from recipes.compress import compare
from recipes.compress import methods as M
from recipes.compress.evaluate import evenly_spaced, perplexity
from recipes.compress.heal import heal, training_batches

CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, CONFIG.vocab_size, (6, 16), generator=torch.Generator().manual_seed(1))
    grams = M.calibration_grams(model, [ids[:3]])

    def fresh():
        m = LlamaForCausalLM(CONFIG)
        m.load_state_dict(state)
        return m

    return fresh, ids, grams


def test_index_bytes_takes_the_smaller_of_int32_and_bitmap():
    assert M.index_bytes(10, 64, 64) == (40, "int32")  # 40 bytes against a 512-byte bitmap
    assert M.index_bytes(2048, 64, 64) == (512, "bitmap")
    assert M.index_bytes(128, 64, 64) == (512, "int32")  # equal: int32


def test_dct_matrix_is_scipys_orthonormal_dct():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = torch.randn(12, dtype=torch.float64)
    expected = torch.from_numpy(scipy_fft.dct(x.numpy(), norm="ortho"))
    torch.testing.assert_close(M.dct_matrix(12) @ x, expected)


def test_obs_sparsify_keeps_k_and_beats_plain_selection_on_the_output_error():
    torch.manual_seed(0)
    x = torch.randn(200, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)  # correlated inputs
    w = torch.randn(10, 24, dtype=torch.float64)
    keep = 80
    fitted = M.obs_sparsify(w, x.T @ x, keep, block=8)
    assert int((fitted != 0).sum()) == keep
    plain = torch.zeros(w.numel(), dtype=torch.float64)
    top = torch.topk(w.abs().flatten(), keep).indices
    plain[top] = w.flatten()[top]
    plain = plain.view_as(w)
    def error(v):
        return float(torch.linalg.norm(x @ (w - v).T))

    assert error(fitted) < 0.9 * error(plain)  # 0.78 measured


def test_whitened_svd_beats_plain_svd_on_the_output_error():
    torch.manual_seed(0)
    x = torch.randn(300, 20, dtype=torch.float64) * torch.linspace(0.1, 5.0, 20, dtype=torch.float64)
    w = torch.randn(16, 20, dtype=torch.float64)
    b, a = M.whitened_svd(w, x.T @ x, 5, damp=1e-8)
    u, s, vh = torch.linalg.svd(w)
    plain = u[:, :5] * s[:5] @ vh[:5]
    def error(v):
        return float(torch.linalg.norm(x @ (w - v).T))

    assert error(b @ a) < error(plain)


@pytest.mark.parametrize(
    "method",
    [
        M.Method("dct_energy", "spectral", "energy"),
        M.Method("dct_lowfreq", "spectral", "lowfreq"),
        M.Method("rand_energy", "spectral", "energy", "random_orthonormal"),
        M.Method("svd", "svd"),
        M.Method("prune", "prune"),
        M.Method("dct_act", "spectral_act"),
        M.Method("prune_act", "prune_act"),
        M.Method("svd_act", "svd_act"),
    ],
    ids=lambda m: m.name,
)
def test_each_method_stores_its_budget_and_counts_bytes_from_the_tensors(tiny, method):
    fresh, ids, grams = tiny
    fraction = 0.5
    model, storage = M.compress(fresh(), method, fraction, grams)
    shapes = [(layer.out_features, layer.in_features) for layer in M.target_linears(fresh()).values()]
    assert storage["layers"] == len(shapes) == 14
    assert storage["dense_numbers"] == sum(m * n for m, n in shapes)
    if method.kind in ("svd", "svd_act"):
        assert storage["stored_numbers"] == sum(M.svd_rank(m, n, fraction) * (m + n) for m, n in shapes)
        assert storage["targeted_bytes"] == 4 * storage["stored_numbers"] and storage["index"] == "none"
    elif method.layout == "lowfreq":
        assert storage["targeted_bytes"] == 4 * storage["stored_numbers"] and storage["index"] == "none"
    else:  # values in fp32 plus an m x n bitmap (smaller than int32 at half the entries)
        assert storage["stored_numbers"] == sum(M.budget(m, n, fraction) for m, n in shapes)
        assert storage["targeted_bytes"] == 4 * storage["stored_numbers"] + sum(math.ceil(m * n / 8) for m, n in shapes)
        assert storage["index"] == "bitmap"
    assert storage["model_bytes"] < storage["dense_model_bytes"]
    assert storage["dense_model_bytes"] - storage["model_bytes"] == storage["dense_targeted_bytes"] - storage["targeted_bytes"]
    if method.kind.startswith("spectral"):
        assert sum(isinstance(m, SpectralLayer) for m in model.modules()) == 14
    assert math.isfinite(perplexity(model, ids))


def test_activation_aware_spectral_model_holds_the_fitted_coefficients(tiny):
    """The fit (obs_sparsify on the DCT coefficients, Hessian C_n G C_n^T) is what the replace-mode model rebuilds."""
    fresh, ids, grams = tiny
    name = "model.layers.0.self_attn.q_proj"
    w = M.target_linears(fresh())[name].weight.detach().double()
    m, n = w.shape
    cm, cn = M.dct_matrix(m), M.dct_matrix(n)
    s_k = M.obs_sparsify(cm @ w @ cn.T, cn @ grams[name] @ cn.T, M.budget(m, n, 0.25))
    fitted, _ = M.compress(fresh(), M.Method("dct_act", "spectral_act"), 0.25, grams)
    assert fitted.peft_config["default"].mode == "replace"
    layer = fitted.get_submodule("base_model.model." + name)
    rebuilt = layer.get_delta_weight("default").detach().double()
    torch.testing.assert_close(rebuilt, cm.T @ s_k @ cn, atol=1e-5, rtol=1e-4)
    plain, _ = M.compress(fresh(), M.Method("dct_energy", "spectral", "energy"), 0.25)
    plain_rebuilt = plain.get_submodule("base_model.model." + name).get_delta_weight("default").detach().double()
    assert not torch.allclose(plain_rebuilt, rebuilt, atol=1e-4)  # the fit is not the plain projection


def test_healing_trains_and_keeps_pruned_zeros(tiny):
    fresh, ids, _ = tiny
    model, _ = M.compress(fresh(), M.Method("prune", "prune"), 0.5)
    linear = model.model.layers[0].self_attn.q_proj
    zeros = ~linear.prune_mask
    before = linear.weight.detach().clone()
    batches = training_batches({"a": ids[:3], "b": ids[3:]}, 4, 2, seed=0)
    out = heal(model, batches, 1e-2)
    assert len(out["losses"]) == 4 and out["losses"][-1] < out["losses"][0]
    assert torch.all(linear.weight[zeros] == 0)
    assert not torch.equal(linear.weight[~zeros], before[~zeros])


def test_healing_a_spectral_model_with_spectral_adamw_moves_the_coefficients(tiny):
    fresh, ids, _ = tiny
    model, _ = M.compress(fresh(), M.Method("dct_energy", "spectral", "energy"), 0.5)
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj")
    before = layer.spectral_coefficients["default"].detach().clone()
    out = heal(model, training_batches({"a": ids}, 3, 2, seed=0), 1e-2, "spectral_adamw")
    assert out["optimizer"] == "spectral_adamw" and out["losses"][-1] < out["losses"][0]
    assert not torch.equal(layer.spectral_coefficients["default"].detach(), before)


def test_training_batches_alternate_texts_and_depend_on_the_seed():
    train = {"a": torch.zeros(5, 4, dtype=torch.long), "b": torch.ones(5, 4, dtype=torch.long)}
    batches = training_batches(train, 2, 4, seed=0)
    assert [int(r[0]) for r in batches[0]] == [0, 1, 0, 1]
    ranged = {"a": torch.arange(40).view(10, 4), "b": torch.arange(40).view(10, 4) + 100}
    assert not all(torch.equal(x, y) for x, y in zip(training_batches(ranged, 3, 2, 0), training_batches(ranged, 3, 2, 1), strict=True))


def test_evenly_spaced_takes_first_and_last():
    blocks = torch.arange(10).view(10, 1)
    assert evenly_spaced(blocks, 3).flatten().tolist() == [0, 4, 9] or evenly_spaced(blocks, 3).flatten().tolist() == [0, 5, 9]
    assert evenly_spaced(blocks, 20).shape[0] == 10


def test_compare_makes_tables_and_plot_from_run_jsons(tmp_path):
    folder = tmp_path / "p"
    (folder / "prune").mkdir(parents=True)
    (folder / "dct_energy").mkdir()
    dense = {"method": "dense", "fraction": 1.0, "perplexity": {"shakespeare": 50.0, "rotten_tomatoes": 55.0}}
    (folder / "dense.json").write_text(json.dumps(dense))
    storage = {"model_bytes": 300 * 2**20, "dense_model_bytes": 500 * 2**20, "index": "bitmap"}
    for method, ppl in (("prune", 60.0), ("dct_energy", 80.0)):
        run = {"method": method, "fraction": 0.75, "perplexity": {"shakespeare": ppl, "rotten_tomatoes": ppl + 1},
               "storage": storage, "wall_seconds": 1.0}
        (folder / method / "f0.75.json").write_text(json.dumps(run))
        healed = dict(run, perplexity={"shakespeare": ppl - 5, "rotten_tomatoes": ppl - 4},
                      heal={"optimizer": "adamw", "losses": [3.0, 2.5], "step_seconds": [1.0, 1.2]})
        (folder / method / "f0.75_heal_adamw_s0.json").write_text(json.dumps(healed))
    d, compressed, healed = compare.load(folder)
    table = compare.compression_table(d, compressed)
    rows = table.splitlines()
    assert rows[2].startswith("| dense | 50.0 | 55.0")
    assert rows[3].startswith("| dct_energy | 80.0 | 81.0") and rows[4].startswith("| prune | 60.0")
    assert "300 MiB (60%)" in compare.storage_table(d, compressed)
    assert "| prune | 0.75 | adamw | 1 | 60.0 | 55.0 |" in compare.heal_table(compressed, healed)
    pytest.importorskip("matplotlib")
    compare.plot(d, compressed, healed, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
