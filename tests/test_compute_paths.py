"""Every compute path gives the reference's outputs and gradients; the weight cache follows every change;
no path keeps more than one m x n buffer for backward; replace mode's resident size falls with K."""

import contextlib

import pytest
import torch
from hf_spectral.bases import basis_matrix
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_spectral import CoefficientSpace, SpectralConfig, SpectralLinear, set_compute_path, set_weight_cache
from hf_spectral.compute import cost_model, dispatch, functions

M, N = 21, 34  # odd and even, so both FFT branches are taken
TOKENS = (2, 5)  # T = 10 < M, N: activations are smaller than one M x N buffer


def _layer(mode, layout, basis="dct", conv=False, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = Conv1D(M, N) if conv else nn.Linear(N, M, bias=bias)
    if conv:
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    base = base.to(dtype)
    budget = {"n_coefficients": 90} if mode == "delta" else {"coefficient_fraction": 0.25}
    config = SpectralConfig(
        mode=mode, layout=layout, basis=basis, init_weights=False if mode == "delta" else "random", scaling=3.0,
        fan_in_fan_out=conv, grid_rank=15, **budget,  # grid_rank: a sparse grid on 15 of the 21 rows and 34 columns
    )
    layer = SpectralLinear(base, "default", config, "layer", from_pretrained=False)
    if mode == "replace":
        layer.release_base_weight()
    return layer


def _reference(layer, x, adapter="default"):
    """y = x W^T + b with W built from explicit basis matrices in float64, differentiable in the coefficients."""
    settings = layer.spectral_settings[adapter]
    values = layer.spectral_coefficients[adapter]
    b_m = basis_matrix(settings.basis, M, settings.seed, torch.float64)
    b_n = basis_matrix(settings.basis, N, settings.seed, torch.float64)
    if settings.block is not None:
        p, q = settings.block
        rows, cols = (torch.tensor(f) for f in settings.grid) if settings.grid else (torch.arange(p), torch.arange(q))
        full = torch.zeros(M, N, dtype=torch.float64).index_put((rows.repeat_interleave(q), cols.repeat(p)), values.double())
    else:
        full = torch.zeros(M * N, dtype=torch.float64).index_put((layer._indices(adapter).cpu(),), values.double()).view(M, N)
    weight = b_m.T @ full @ b_n
    base = layer.get_base_layer()
    if settings.mode == "delta":
        w0 = base.weight.double()
        weight = (w0.T if layer.fan_in_fan_out else w0) + settings.scaling * weight
    out = x.double() @ weight.T
    return out if base.bias is None else out + base.bias.double()


@contextlib.contextmanager
def forced_transform(layer, transform):
    """Within the block the layer's DCT transforms run as ``transform`` ("fft", "matmul" or "auto")."""
    previous, layer.transform = layer.transform, transform
    try:
        yield
    finally:
        layer.transform = previous


def _outputs_and_grads(fn, layer, x, upstream):
    params = [layer.spectral_coefficients["default"]]
    bias = layer.get_base_layer().bias
    if bias is not None:
        params.append(bias)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    grads = torch.autograd.grad(out, [x, *params], upstream.to(out.dtype))
    return out.detach(), grads


CASES = [
    (mode, layout, basis, conv)
    for mode in ("delta", "replace")
    for layout in ("lowfreq", "grid", "random")
    for basis, conv in (("dct", False), ("dct", True), ("random_orthonormal", False))
]


@pytest.mark.parametrize("mode,layout,basis,conv", CASES)
def test_every_path_gives_the_reference_outputs_and_gradients(mode, layout, basis, conv):
    layer = _layer(mode, layout, basis, conv)
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    upstream = torch.randn(*TOKENS, M, dtype=torch.float64)
    expected, expected_grads = _outputs_and_grads(lambda t: _reference(layer, t), layer, x, upstream)
    paths = dispatch.available_paths(layer.coefficient_space("default"), mode)
    # a grid's frequencies are not the first of an FFT's: it runs its block by matmuls only (a sparse grid's
    # scattered positions take every path)
    assert ("factored" in paths) == (layout != "random") and ("spectral" in paths) == (basis == "dct" and layout != "grid")
    for transform in ("matmul", "fft"):
        for path in paths:
            layer.compute_path = path
            with forced_transform(layer, transform if basis == "dct" else "auto"):
                out, grads = _outputs_and_grads(layer, layer, x, upstream)
            assert layer.last_compute_path == path
            where = f"{path} ({transform})"
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, msg=where)
            for got, want, name in zip(grads, expected_grads, ("x", "coefficients", "bias")[: len(grads)], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{where}: gradient of {name}")


@pytest.mark.parametrize(
    "mode,layout",
    [("delta", "random"), ("delta", "lowfreq"), ("delta", "grid"), ("delta", "sparse_grid"), ("replace", "random"), ("replace", "lowfreq")],
)
def test_paths_in_float32_and_under_bf16_autocast(mode, layout):
    layer = _layer(mode, layout, dtype=torch.float32)
    x = torch.randn(*TOKENS, N)
    expected = _reference(layer, x)
    for path in dispatch.available_paths(layer.coefficient_space("default"), mode):
        layer.compute_path = path
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4, msg=path)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16, path
        torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05, msg=path)
        out.float().sum().backward()
        assert torch.isfinite(layer.spectral_coefficients["default"].grad).all()
        layer.spectral_coefficients["default"].grad = None


def test_a_path_that_does_not_fit_the_layer_is_a_clear_error():
    delta, grid, replace = _layer("delta", "random"), _layer("delta", "grid"), _layer("replace", "lowfreq")
    for layer, path, message in [
        (delta, "factored", "not available.*scattered positions"),
        (grid, "spectral", "not available.*block"),
        (delta, "fastest", "compute_path must be one of"),
        (replace, "separate", "not available"),
    ]:
        layer.compute_path = path
        with pytest.raises(ValueError, match=message):
            layer(torch.randn(3, N, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# what is kept for backward


def _big_saved_tensors(layer, x):
    """Tensors of at least M * N elements that autograd keeps for backward, other than parameters."""
    owned = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), x)}
    saved = []

    def pack(t):
        if t.numel() >= M * N and t.untyped_storage().data_ptr() not in owned:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


@pytest.mark.parametrize(
    "mode,layout",
    [("delta", "random"), ("delta", "lowfreq"), ("delta", "grid"), ("delta", "sparse_grid"), ("replace", "random"), ("replace", "lowfreq")],
)
def test_no_path_keeps_more_than_one_dense_buffer_for_backward(mode, layout):
    layer = _layer(mode, layout)
    x = torch.randn(*TOKENS, N, dtype=torch.float64, requires_grad=True)
    for transform in ("matmul", "fft"):
        for path in dispatch.available_paths(layer.coefficient_space("default"), mode):
            layer.compute_path = path
            with forced_transform(layer, transform):
                saved = _big_saved_tensors(layer, x)
            expected = 0 if path in ("factored", "spectral") else 1  # the merged weight, or the update
            assert len(saved) == expected, (path, transform, saved)


def test_replace_mode_resident_size_falls_with_k():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))

    def resident_bytes(module):
        tensors = {t.untyped_storage().data_ptr(): t for t in (*module.parameters(), *module.buffers())}
        return sum(t.untyped_storage().nbytes() for t in tensors.values())

    dense = resident_bytes(model())
    sizes = []
    for fraction in (0.5, 0.125):
        for layout in ("lowfreq", "random"):
            config = SpectralConfig(mode="replace", coefficient_fraction=fraction, layout=layout, target_modules=["0", "2"])
            sizes.append((fraction, layout, resident_bytes(get_peft_model(model(), config))))
    for fraction, layout, size in sizes:
        weights = 64 * 96 * 2 * 4
        # K coefficients in fp32 (+ an int64 index per coefficient for random layouts, rebuilt from the seed
        # and not saved) and the biases; no dense weight
        per_coefficient = 4 if layout == "lowfreq" else 12
        assert size <= dense - weights + fraction * 64 * 96 * 2 * per_coefficient + 64, (fraction, layout, size)
    assert sizes[2][2] < sizes[0][2] and sizes[3][2] < sizes[1][2]


# --------------------------------------------------------------------------------------------------
# evaluation: the cached weight


def _eval(layer, x):
    with torch.no_grad():
        return layer(x)


def test_evaluation_uses_the_cached_weight_and_follows_every_change():
    layer = _layer("delta", "random")
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    coefficients = layer.spectral_coefficients["default"]
    first = _eval(layer, x)
    assert layer.last_compute_path == "cached"
    torch.testing.assert_close(first, _reference(layer, x).detach())
    cached = layer._weight_cache.weight
    _eval(layer, x)
    assert layer._weight_cache.weight is cached  # reused, not rebuilt

    with torch.no_grad():
        coefficients.mul_(2.0)  # an optimizer step: in place, bumps _version
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x).detach())
    assert layer._weight_cache.weight is not cached

    coefficients.data = coefficients.data * 0.5  # a new tensor behind the same parameter
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x).detach())

    with torch.no_grad():
        layer.get_base_layer().weight.add_(0.1)  # the base weight changed too
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x).detach())

    # a training forward drops the cache (it would only hold memory) and does not use it
    out = layer(x)
    assert layer._weight_cache is None and layer.last_compute_path != "cached"
    torch.testing.assert_close(out, _reference(layer, x))
    _eval(layer, x)
    layer.train()
    assert layer._weight_cache is None

    # switched off: evaluation takes the cheapest path without a cache
    layer.cache_weights = False
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x).detach())
    assert layer.last_compute_path != "cached" and layer._weight_cache is None


def test_a_state_dict_load_drops_the_cache_even_when_the_write_hides_its_version_bump():
    """Under FSDP2 a load writes the shards, and the next forward gathers them into the same memory with the
    version counter preserved: the cache cannot see that. Every load goes through load_state_dict
    (set_model_state_dict does), and that drops the cache."""
    layer = _layer("delta", "random")
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    coefficients = layer.spectral_coefficients["default"]
    state = layer.state_dict()
    state = {**state, "spectral_coefficients.default": state["spectral_coefficients.default"] * 3.0}

    _eval(layer, x)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(coefficients):
        coefficients.mul_(2.0)  # a hidden write, as FSDP2's all-gather copy-out makes
    assert not torch.allclose(_eval(layer, x), _reference(layer, x).detach())  # why loads must drop the cache

    watched = (coefficients, layer.get_base_layer().weight, layer.get_base_layer().bias)
    with torch.autograd._unsafe_preserve_version_counter(watched):
        layer.load_state_dict(state)  # a load whose writes hide their version bumps
    torch.testing.assert_close(coefficients.detach(), state["spectral_coefficients.default"])
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x).detach())


def test_cache_is_dropped_on_adapter_switch_merge_and_delete():
    layer = _layer("delta", "lowfreq")
    other = SpectralConfig(n_coefficients=40, layout="random", init_weights=False, scaling=2.0, seed=3)
    layer.update_layer("other", other, "layer", from_pretrained=False)
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    layer.set_adapter("default")
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x, "default").detach())
    layer.set_adapter("other")
    assert layer._weight_cache is None
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x, "other").detach())

    expected = _eval(layer, x)
    layer.merge()
    assert layer._weight_cache is None
    torch.testing.assert_close(_eval(layer, x), expected)
    layer.unmerge()
    torch.testing.assert_close(_eval(layer, x), expected)

    layer.set_adapter("default")
    _eval(layer, x)
    layer.delete_adapter("other")
    assert layer._weight_cache is None
    torch.testing.assert_close(_eval(layer, x), _reference(layer, x, "default").detach())


def test_frozen_coefficients_use_the_cache_with_gradients_on_and_after_inference_mode():
    layer = _layer("replace", "random")
    layer.requires_grad_(False)
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    out = layer(x)  # the cache built under inference_mode cannot be saved for backward: rebuilt
    assert layer.last_compute_path == "cached"
    out.sum().backward()
    torch.testing.assert_close(out, _reference(layer, x))
    assert x.grad is not None


def test_model_switches_and_merge_and_unload_leave_plain_linear_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    peft_model = get_peft_model(model, SpectralConfig(n_coefficients=50, init_weights=False, target_modules=["0", "2"]))
    x = torch.randn(4, 16)
    assert set_compute_path(peft_model, "sampled") == 2
    training = peft_model(x)
    assert set_weight_cache(peft_model, False) == 2
    with torch.no_grad():
        uncached = peft_model(x)
    set_weight_cache(peft_model, True)
    with torch.no_grad():
        cached = peft_model(x)
    torch.testing.assert_close(uncached, training.detach())
    torch.testing.assert_close(cached, training.detach())
    with pytest.raises(ValueError, match="compute path must be one of"):
        set_compute_path(peft_model, "fast")
    merged = peft_model.merge_and_unload()
    assert type(merged[0]) is nn.Linear and type(merged[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x), cached, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the choice


def test_auto_takes_the_cheapest_path_of_the_cost_model():
    def plan(m, n, k, layout):
        if layout == "lowfreq":
            from hf_spectral.layouts import lowfreq_block

            return CoefficientSpace(m, n, "dct", 0, block=lowfreq_block(m, n, k))
        return CoefficientSpace(m, n, "dct", 0, indices=torch.arange(k))  # positions do not change costs

    for device in ("cpu", "cuda"):
        for m, n, k, layout, mode in [
            (2048, 2048, 2048 * 2048 // 8, "lowfreq", "replace"),
            (2048, 2048, 2048 * 2048 // 2, "random", "replace"),
            (4096, 4096, 1000, "random", "delta"),
            (768, 768, 65536, "lowfreq", "delta"),
        ]:
            p = plan(m, n, k, layout)
            costs = cost_model.estimate_costs(p, mode, 4096, device)
            chosen = cost_model.choose_path(p, mode, 4096, device, coefficient_grad=True, input_grad=True)
            allowed = cost_model.DEVICE_COSTS[device].auto_paths
            assert chosen in allowed and costs[chosen] == min(v for key, v in costs.items() if key in allowed)
            assert set(costs) == set(dispatch.available_paths(p, mode))
        # a small block is never built into a dense weight when there are many tokens
        small_block = plan(2048, 2048, 2048 * 2048 // 8, "lowfreq")
        assert cost_model.choose_path(small_block, "replace", 4096, device, coefficient_grad=True, input_grad=True) in ("factored", "spectral")
        # a full-rank random half of the coefficients is
        half_random = plan(2048, 2048, 2048 * 2048 // 2, "random")
        assert cost_model.choose_path(half_random, "replace", 4096, device, coefficient_grad=True, input_grad=True) == "dense"


def test_on_a_cpu_the_work_that_gains_little_from_threads_costs_more_per_matmul_flop_with_more_threads():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cost_model.costs_for("cpu")
        assert one == cost_model.DEVICE_COSTS["cpu"]  # the constants were measured at one thread
        torch.set_num_threads(2)
        two = cost_model.costs_for("cpu")
    finally:
        torch.set_num_threads(previous)
    factor = 2 ** cost_model._CPU_THREAD_EXPONENT
    for name in ("elementwise", "fft", "sparse", "launch"):
        assert getattr(two, name) == pytest.approx(getattr(one, name) * factor), name
    assert two.half_matmul == one.half_matmul and cost_model.costs_for("cuda") == cost_model.DEVICE_COSTS["cuda"]


def test_the_sampled_gradient_summed_over_token_chunks_is_the_same(monkeypatch):
    monkeypatch.setattr(functions, "sampled_chunk", lambda space, tokens: 3)  # 10 tokens: chunks of 3, 3, 3, 1
    for layout in ("lowfreq", "random"):
        layer = _layer("delta", layout)
        layer.compute_path = "sampled"
        x = torch.randn(*TOKENS, N, dtype=torch.float64)
        upstream = torch.randn(*TOKENS, M, dtype=torch.float64)
        expected = _outputs_and_grads(lambda t, layer=layer: _reference(layer, t), layer, x, upstream)
        for transform in ("matmul", "fft"):
            with forced_transform(layer, transform):
                got = _outputs_and_grads(layer, layer, x, upstream)
            for a, b in zip(got[1], expected[1], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# on a GPU (skipped elsewhere)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,layout", [("delta", "random"), ("delta", "lowfreq"), ("replace", "random"), ("replace", "lowfreq")])
def test_every_path_on_cuda_gives_the_reference(mode, layout, dtype):
    layer = _layer(mode, layout, dtype=torch.float64)
    x = torch.randn(*TOKENS, N, dtype=torch.float64)
    upstream = torch.randn(*TOKENS, M, dtype=torch.float64)
    expected, expected_grads = _outputs_and_grads(lambda t: _reference(layer, t), layer, x, upstream)
    layer = layer.to("cuda")
    layer.get_base_layer().to(dtype)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    for transform in ("matmul", "fft"):
        for path in dispatch.available_paths(layer.coefficient_space("default"), mode):
            layer.compute_path = path
            with forced_transform(layer, transform):
                out, grads = _outputs_and_grads(layer, layer, x.to("cuda", dtype), upstream.to("cuda", dtype))
            where = f"{path} ({transform}, {dtype})"
            scale = expected.abs().max()
            torch.testing.assert_close(out.double().cpu() / scale, expected / scale, rtol=tol, atol=tol, msg=where)
            for got, want in zip(grads, expected_grads, strict=True):
                s = want.abs().max()
                torch.testing.assert_close(got.double().cpu() / s, want / s, rtol=tol, atol=tol, msg=where)


@cuda
@pytest.mark.parametrize("n", [1, 2, 7, 64, 129, 1024])
def test_fused_transforms_on_cuda_match_the_reference(n):
    from hf_spectral.dct import dct_lastdim, idct_lastdim

    from hf_spectral import triton_kernels

    x = torch.randn(33, n, dtype=torch.float64)
    for keep in sorted({1, n // 2, n // 2 + 1, n} - {0}):
        expected = dct_lastdim(x, keep)
        got = dct_lastdim(x.float().cuda(), keep)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-4)
        got_t = dct_lastdim(x.float().cuda(), keep, transpose=True)
        torch.testing.assert_close(got_t.double().cpu(), expected.T, rtol=1e-4, atol=1e-4)
        c = torch.randn(keep, 33, dtype=torch.float64).T  # strided input
        expected = idct_lastdim(c, n)
        torch.testing.assert_close(idct_lastdim(c.float().cuda(), n).double().cpu(), expected, rtol=1e-4, atol=1e-4)
    assert triton_kernels.usable(x.float().cuda()) == triton_kernels.HAS_TRITON


def test_fused_transform_kernels_in_the_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if torch.cuda.is_available():
        pytest.skip("checked on the device itself")
    import importlib

    from hf_spectral.dct import dct_lastdim

    from hf_spectral import triton_kernels

    importlib.reload(triton_kernels)  # the interpreter is chosen when the kernels are defined
    for n in (1, 6, 17):
        x = torch.randn(5, n)
        for keep in sorted({1, n // 2 + 1, n} - {0}):
            torch.testing.assert_close(triton_kernels.dct_lastdim(x, keep), dct_lastdim(x, keep))


@cuda
@pytest.mark.parametrize("mode,layout", [("delta", "random"), ("delta", "lowfreq"), ("replace", "random"), ("replace", "lowfreq")])
def test_no_path_synchronises_with_the_host_on_cuda(mode, layout):
    layer = _layer(mode, layout, dtype=torch.float32).to("cuda")
    x = torch.randn(64, N, device="cuda", requires_grad=True)
    failures = []
    for path in dispatch.available_paths(layer.coefficient_space("default"), mode):
        layer.compute_path = path
        layer(x).sum().backward()  # warm the bases, index patterns and plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x).sum().backward()
            with torch.no_grad():
                layer(x)  # the cached evaluation path
        except RuntimeError as error:
            failures.append(f"{path}: {error}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not failures, failures


def test_sparse_products_follow_unsorted_indices():
    indices = torch.randperm(M * N)[:50]  # e.g. read from a file written by other code: not sorted
    plan = CoefficientSpace(M, N, "dct", 0, indices=indices)
    values = torch.randn(50, dtype=torch.float64)
    dense = torch.zeros(M * N, dtype=torch.float64).index_put((indices,), values).view(M, N)
    torch.testing.assert_close(plan.sparse_matrix(values).to_dense(), dense)
    torch.testing.assert_close(plan.sparse_matrix(values, transposed=True).to_dense(), dense.T)
    a_t, b = torch.randn(M, 7, dtype=torch.float64), torch.randn(7, N, dtype=torch.float64)
    torch.testing.assert_close(plan.sampled_product(a_t, b), (a_t @ b).reshape(-1)[indices])
