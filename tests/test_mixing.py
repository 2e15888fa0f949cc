"""Spectral token mixing: the dictionary's causal mix, the swap, decoding with a state, save/load, replace mode."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, make_bert, make_gpt2, make_llama
from transformers import AutoModelForCausalLM

from hf_spectral import SpectralConfig, SpectralLayer
from hf_spectral.mixing import (
    SpectralMixer,
    SpectralMixingConfig,
    causal_mix,
    causal_read,
    from_pretrained,
    mixer_parameter_count,
    replace_attention,
    scan,
)
from hf_spectral.mixing.atoms import log_step

FACTORIES = {"gpt2": make_gpt2, "llama": make_llama}


def mixer_model(name="gpt2", **settings):
    return replace_attention(FACTORIES[name](), SpectralMixingConfig(**settings))


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the dictionary's mix ---------------------------------------------------------------------------------------


def random_mix_inputs(length=37, atoms=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.complex(torch.randn(2, length, atoms, generator=g), torch.randn(2, length, atoms, generator=g))
    omega = torch.rand(atoms, generator=g) * 3.14
    log_decay = torch.log(torch.rand(atoms, generator=g) * 0.5 + 0.01)
    state = torch.complex(torch.randn(2, atoms, generator=g), torch.randn(2, atoms, generator=g))
    return u, log_step(omega, log_decay), state


@pytest.mark.parametrize("with_state", [False, True])
def test_fft_mix_equals_the_recurrence(with_state):
    u, log_a, state = random_mix_inputs()
    state = state if with_state else None
    torch.testing.assert_close(causal_mix(u, log_a, state), scan(u, log_a, state), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_the_read_equals_the_real_part_of_the_phased_recurrence_with_its_gradients(length, with_state):
    """causal_read (real FFTs, gain folded into the kernel) against the recurrence: values, last state, gradients."""
    u, log_a, state = random_mix_inputs(length=length)
    state = state if with_state else None
    g = torch.Generator().manual_seed(3)
    gain = torch.complex(torch.rand(5, generator=g), torch.randn(5, generator=g)).requires_grad_()
    real, imag = u.real.clone().requires_grad_(), u.imag.clone().requires_grad_()
    log_a = log_a.detach().requires_grad_()
    weights = torch.randn(2, length, 5, generator=g)

    read, last = causal_read(real, imag, log_a, gain, state, keep_state=True)
    reference_x = scan(torch.complex(real, imag), log_a, state)
    reference = (gain * reference_x).real
    torch.testing.assert_close(read, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(last, reference_x[:, -1], atol=2e-5, rtol=1e-5)
    assert causal_read(real, imag, log_a, gain, state)[1] is None  # no state asked for, none computed

    grads = torch.autograd.grad((read * weights).sum(), (real, imag, log_a, gain), materialize_grads=True)
    expected = torch.autograd.grad((reference * weights).sum(), (real, imag, log_a, gain), materialize_grads=True)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_reads_hand_written_backward_passes_gradcheck():
    from hf_spectral.mixing.atoms import _RealCausalConvolution

    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in ((2, 3, 6), (2, 3, 6), (3, 6), (3, 6))]
    assert torch.autograd.gradcheck(lambda *x: _RealCausalConvolution.apply(*x, 16), inputs)


def test_mix_is_causal_and_splits_into_prefix_plus_carried_state():
    u, log_a, _ = random_mix_inputs(length=40)
    changed = u.clone()
    changed[:, 25:] += 10.0
    torch.testing.assert_close(causal_mix(changed, log_a)[:, :25], causal_mix(u, log_a)[:, :25])
    first = causal_mix(u[:, :25], log_a)
    rest = causal_mix(u[:, 25:], log_a, first[:, -1])
    torch.testing.assert_close(torch.cat([first, rest], 1), causal_mix(u, log_a), atol=2e-5, rtol=1e-5)


def test_model_output_is_causal():
    model = mixer_model()
    x = ids(length=16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits[:, :10], model(input_ids=y).logits[:, :10])


# -- the swap -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_no_attention_is_left_and_parameters_match(name):
    base = FACTORIES[name]()
    attention = [m for m in base.modules() if type(m).__name__.endswith("Attention")]
    attention_params = sum(p.numel() for m in attention for p in m.parameters())
    model = replace_attention(base)
    assert not [m for m in model.modules() if "Attention" in type(m).__name__]
    mixers = [m for m in model.modules() if isinstance(m, SpectralMixer)]
    assert len(mixers) == len(attention) == 2
    mixer_params = sum(p.numel() for m in mixers for p in m.parameters())
    assert abs(mixer_params - attention_params) / attention_params < 0.02
    bias = name == "gpt2"
    assert mixer_params == 2 * mixer_parameter_count(32, mixers[0].n_atoms, bias)
    assert model.config.spectral_mixing["n_atoms"] == mixers[0].n_atoms


def test_unsupported_models_and_misuse_get_clear_errors():
    with pytest.raises(ValueError, match=r"\['gpt2', 'llama'\].*model_type='bert'"):
        replace_attention(make_bert())
    model = mixer_model()
    with pytest.raises(ValueError, match="already has spectral mixers"):
        replace_attention(model)
    peft_model = get_peft_model(make_gpt2(), SpectralConfig(mode="replace", target_modules=["c_fc"]))
    with pytest.raises(TypeError, match="swap the attention first"):
        replace_attention(peft_model)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"n_atoms": 0}, "n_atoms=0"),
        ({"min_half_life": 10.0, "max_half_life": 2.0}, "max_half_life=2.0 is below"),
        ({"max_frequency": 4.0}, r"max_frequency=4.0 .*\(0, pi\]"),
        ({"gate": "relu"}, "gate='relu'"),
        ({"stft_weight": -1.0}, "stft_weight=-1.0"),
        ({"prior_components": 0}, "prior_components=0"),
    ],
)
def test_bad_settings_name_the_value_and_the_range(settings, message):
    with pytest.raises(ValueError, match=message):
        SpectralMixingConfig(**settings)


# -- decoding with a state ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generate_is_the_same_with_and_without_the_cache(name):
    model = mixer_model(name)
    prompt = ids(batch=1, length=5)
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 25)
    assert torch.equal(with_cache, without)


def test_cached_steps_give_the_full_forward_logits_and_a_fixed_size_state():
    model = mixer_model()
    x = ids(length=20)
    with torch.no_grad():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :8], use_cache=True)
        cache, pieces = out.cache, [out.logits]
        sizes = []
        for t in range(8, 20):
            out = model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            sizes.append(sum(layer.state.numel() for layer in cache.layers))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 20
    assert len(set(sizes)) == 1  # the state does not grow with the context


def test_beam_search_follows_the_reordered_state():
    model = mixer_model("llama")
    prompt = ids(batch=1, length=4)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_left_padding_is_not_mixed_in():
    model = mixer_model("llama")  # the mixer model ignores positions, so padding on the left changes nothing
    x = ids(batch=1, length=9)
    padded = torch.cat([torch.full((1, 3), 5), x], 1)  # not the pad id, whose embedding is 0
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=x).logits
        with_pad = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
        ignoring_mask = model(input_ids=padded).logits[:, 3:]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-5)
    assert (ignoring_mask - alone).abs().max() > 1e-4  # the mask is what made the difference


def test_crop_cannot_roll_back_a_state():
    model = mixer_model()
    out = model(input_ids=ids(length=6), use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        out.cache.crop(-2)


# -- the paper's auxiliary objectives -----------------------------------------------------------------------------


def train(model, steps=12, lr=2e-2):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    x = ids(batch=4, length=32, seed=3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def term_of(model, name):
    from hf_spectral.mixing import auxiliary_terms

    for mixer in model.modules():
        if isinstance(mixer, SpectralMixer):
            mixer.record_terms = True
    model.eval()
    with torch.no_grad():
        model(input_ids=ids(batch=4, length=32, seed=3))
    return auxiliary_terms(model)[name]


@pytest.mark.parametrize(
    "name, weight",
    [("reconstruction", "reconstruction_weight"), ("stft", "stft_weight"), ("prior", "prior_weight")],
)
def test_each_auxiliary_objective_lowers_its_own_term(name, weight):
    torch.manual_seed(0)
    with_term = mixer_model(**{weight: 1.0, "stft_window": 8})
    start = term_of(with_term, name)
    train(with_term)
    trained = term_of(with_term, name)
    assert trained < 0.8 * start
    if name != "prior":  # the prior's mixture only exists when its weight is on
        torch.manual_seed(0)
        without = mixer_model(stft_window=8)
        train(without)
        assert trained < term_of(without, name)


def test_auxiliary_terms_enter_the_training_loss_only():
    model = mixer_model(reconstruction_weight=1.0)
    x = ids()
    model.train()
    with_terms = float(model(input_ids=x, labels=x).loss.detach())
    model.eval()
    plain = float(model(input_ids=x, labels=x).loss)
    assert with_terms > plain + 0.1  # a fresh mixer rebuilds its input badly: the term is large


# -- save and load, and replace-mode spectral linears on top --------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_save_and_load_give_identical_logits(tmp_path, name):
    model = mixer_model(name, prior_weight=0.1)
    train(model, steps=3)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert isinstance(loaded, type(model))


def test_loading_a_plain_model_says_what_it_is(tmp_path):
    make_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a spectral-mixer model"):
        from_pretrained(tmp_path)


def test_mixer_plus_replace_mode_has_no_attention_and_no_dense_matrix_and_reloads(tmp_path):
    settings = SpectralConfig(mode="replace", coefficient_fraction=0.5, layout="random", target_modules="all-linear")
    model = get_peft_model(mixer_model(), settings)
    inner = model.base_model.model
    layers = [m for m in inner.modules() if isinstance(m, SpectralLayer)]
    assert len(layers) == 2 * 5  # in_proj, coef_proj, out_proj, c_fc, c_proj per block
    assert all(layer.get_base_layer().weight is None for layer in layers)
    assert inner.lm_head.weight is inner.transformer.wte.weight  # the head is the (tied) embedding
    assert not [m for m in inner.modules() if "Attention" in type(m).__name__]
    losses = train(model, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path)
    fresh = replace_attention(AutoModelForCausalLM.from_config(make_gpt2().config), SpectralMixingConfig())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=0, rtol=0)
    assert torch.equal(
        loaded.generate(x[:1, :4], max_new_tokens=6, do_sample=False),
        model.generate(x[:1, :4], max_new_tokens=6, do_sample=False),
    )


DICTIONARY = ("omega", "log_decay", "phase", "prior_means", "prior_log_scales", "prior_logits")


def dictionary_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if n.rpartition(".")[2] in DICTIONARY}


def test_bf16_model_keeps_a_float32_dictionary_that_small_steps_still_move():
    model = mixer_model("llama", prior_weight=0.1).to(torch.bfloat16)
    assert dictionary_dtypes(model) == {torch.float32}
    mixers = [m for m in model.modules() if isinstance(m, SpectralMixer)]
    assert {m.in_proj.weight.dtype for m in mixers} == {torch.bfloat16}
    model.float().half().bfloat16()  # every route through Module._apply
    assert dictionary_dtypes(model) == {torch.float32}
    before = [m.omega.detach().clone() for m in mixers]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert {m.omega.grad.dtype for m in mixers} == {torch.float32}
    optimizer.step()
    assert all((m.omega.detach() != b).all() for m, b in zip(mixers, before, strict=True))  # bf16 would round it away
    with torch.no_grad():
        logits = model.eval()(input_ids=ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_converting_the_dtype_does_not_round_the_dictionary():
    model = mixer_model()
    omega = [m.omega.detach().clone() for m in model.modules() if isinstance(m, SpectralMixer)]
    model.to(torch.bfloat16).to(torch.float32)
    assert all(torch.equal(m.omega, o) for m, o in zip(
        [m for m in model.modules() if isinstance(m, SpectralMixer)], omega, strict=True))


def test_loading_in_bf16_keeps_the_dictionary_float32(tmp_path):
    model = mixer_model("gpt2", prior_weight=0.1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert dictionary_dtypes(loaded) == {torch.float32}
    assert loaded.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    mixer = loaded.transformer.h[0].attn
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert torch.equal(mixer.omega, model.transformer.h[0].attn.omega)  # loaded exactly, not through bf16


def test_positions_past_gpt2s_learned_table_raise_naming_the_limit():
    model = mixer_model("gpt2")  # n_positions=32
    with torch.no_grad():
        model(input_ids=ids(length=32))
        with pytest.raises(ValueError, match=r"position 32 is past .*n_positions=32"):
            model(input_ids=ids(length=33))
    with pytest.raises(ValueError, match="n_positions=32"):
        model.generate(ids(batch=1, length=30), max_new_tokens=5, do_sample=False)
    with torch.no_grad():  # a Llama mixer model has no position table, so no limit
        assert mixer_model("llama")(input_ids=ids(length=40)).logits.shape[1] == 40


@pytest.mark.parametrize("name, fields, rates", [
    ("gpt2", {"attn_pdrop": 0.3, "resid_pdrop": 0.2}, (0.3, 0.2)),
    ("llama", {"attention_dropout": 0.25}, (0.25, 0.0)),
])
def test_dropout_keeps_the_attentions_rates_in_training_mode_only(name, fields, rates):
    model = replace_attention(FACTORIES[name](**fields))
    mixers = [m for m in model.modules() if isinstance(m, SpectralMixer)]
    assert {(m.mix_dropout.p, m.output_dropout.p) for m in mixers} == {rates}
    x = ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, model(input_ids=x).logits)
        model.train()
        torch.manual_seed(0)
        first = model(input_ids=x).logits
        torch.manual_seed(1)
        assert not torch.equal(first, model(input_ids=x).logits)
        for m in mixers:  # the difference comes from the mixers' dropout
            m.mix_dropout.p = m.output_dropout.p = 0.0
        if name == "llama":  # Llama has no other dropout: now the training forward is deterministic
            assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_n_atoms_help_matches_the_matched_k():
    import dataclasses

    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(SpectralMixingConfig)}["n_atoms"]
    assert "K = d - 1 for GPT-2 and for a Llama without grouped key/value heads" in help_text
    d = 32
    assert mixer_model("gpt2").config.spectral_mixing["n_atoms"] == d - 1
    assert replace_attention(make_llama(num_key_value_heads=4)).config.spectral_mixing["n_atoms"] == d - 1
    assert mixer_model("llama").config.spectral_mixing["n_atoms"] < d - 1  # grouped key/value heads
