"""The one place that reaches into PEFT's internals, and the list of everything ``import hf_spectral``
changes in other libraries (PEFT's and transformers' classes); nothing else in the package patches them.

1. ``SPECTRAL`` in PEFT's method registry. PEFT (checked on 0.21) registers a method with
   ``peft.utils.register_peft_method``, which fills its config, tuner and prefix mappings, but only
   for names that are members of the ``PeftType`` enum. Python enums are closed, so the member is
   added here from outside, through the enum's member maps (``tests/test_peft_registry.py``).
2. ``PeftModel.push_to_hub`` (:func:`install_patches`): transformers' push overwrites the model card
   with a generic one, so for models whose adapters are all spectral it goes to
   ``hf_spectral.ecosystem.hub.push_to_hub``, which uploads the spectral card; every other model keeps
   the original (``tests/test_hub.py`` checks both routes).
3. ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` and transformers' ``model.load_adapter``
   (:func:`install_patches`): PEFT changes the model before it reads the weights file, and reports a
   missing layer as a warning, so a corrupt, edited or mismatched adapter leaves a half-changed model.
   For spectral adapters these check the files first and undo a failed load
   (``hf_spectral.loading``); every other adapter goes straight to the original, with nothing read or
   fetched for it (``tests/test_loading.py``).
4. Private names the tuner uses, imported here only: ``BufferDict`` (index sets saved per adapter) and the
   helpers that tell PEFT's adapter parameters from the rest (replace mode's ``modules_to_save`` rule).
5. ``PeftMixedModel`` (:func:`install_mixed_model_support`): PEFT's mixed model takes a fixed list of methods
   (module-level tuples in ``peft/tuners/mixed/model.py`` and an if/elif chain in
   ``MixedModel._create_and_replace``). Spectral delta adapters are added to those tuples and to the chain, so
   ``get_peft_model(model, lora_config, mixed=True)`` then ``add_adapter("s", SpectralConfig(...))`` works beside
   LoRA, LoHa, LoKr, AdaLoRA, OFT and SHiRA; replace mode is refused there (``tests/test_mixed_adapters.py``).
6. ``peft.utils.hotswap.hotswap_adapter`` (:func:`install_hotswap_route`): PEFT's function swaps LoRA only; an
   adapter that is spectral goes to ``hf_spectral.hotswap_adapter``, every other one to PEFT's
   (``tests/test_hotswap.py``). Code that imported the function before hf_spectral was imported keeps PEFT's.

The tests fail loudly if a peft release changes any of this (``tests/test_peft_registry.py``).
"""

from __future__ import annotations

import enum
import functools
import inspect

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes as filter_state_dict_by_key_prefixes
from peft.tuners.tuners_utils import _get_tuner_state_dict_key_prefixes as tuner_state_dict_key_prefixes
from peft.tuners.tuners_utils import _is_key_under_prefixes as is_key_under_prefixes
from peft.utils import PeftType

from ._names import NAME, PEFT_KEY_PREFIX, PREFIX  # re-exported: the tuner and the loader read them here

__all__ = [
    "NAME", "PREFIX", "PEFT_KEY_PREFIX", "SPECTRAL_PEFT_TYPE", "register", "install_patches", "BufferDict",
    "filter_state_dict_by_key_prefixes", "tuner_state_dict_key_prefixes", "is_key_under_prefixes",
]


def _extend_peft_type(member_name: str) -> PeftType:
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    # class attribute first: EnumType refuses to set an attribute that is already a member
    type.__setattr__(PeftType, member_name, member)
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    return member


SPECTRAL_PEFT_TYPE: PeftType = _extend_peft_type(NAME.upper())
assert isinstance(SPECTRAL_PEFT_TYPE, enum.Enum) and PeftType(NAME.upper()) is SPECTRAL_PEFT_TYPE


def register(config_cls: type, model_cls: type) -> None:
    """Register the spectral method with PEFT; calling it again is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(SPECTRAL_PEFT_TYPE)
    if registered is not None:
        if registered.__qualname__ != model_cls.__qualname__:
            raise RuntimeError(f"PEFT already has a different method registered as {NAME!r}: {registered}.")
        return
    # PEFT's own uniqueness check of prefixes looks at the wrong keys, so check here
    clash = [str(t) for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != SPECTRAL_PEFT_TYPE]
    if clash:
        raise RuntimeError(f"The prefix {PREFIX!r} is already used by PEFT method(s) {clash}.")
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


def install_patches(push_to_hub, is_spectral_model, load_guards) -> None:
    """Items 2 and 3 of the module doc; idempotent. ``push_to_hub`` and ``is_spectral_model`` come from
    ``hf_spectral.ecosystem.hub``, ``load_guards`` (the three wrappers of item 3) from ``hf_spectral.loading``."""
    from peft import PeftModel
    from transformers.integrations.peft import PeftAdapterMixin

    if not getattr(PeftModel.load_adapter, "_hf_spectral_guarded", False):
        owners = ((PeftModel, "from_pretrained"), (PeftModel, "load_adapter"), (PeftAdapterMixin, "load_adapter"))
        for (owner, name), guard in zip(owners, load_guards, strict=True):
            guarded = guard(owner.__dict__[name])
            (guarded.__func__ if isinstance(guarded, classmethod) else guarded)._hf_spectral_guarded = True
            setattr(owner, name, guarded)

    original = PeftModel.push_to_hub
    if getattr(original, "_hf_spectral_original", None) is not None:
        return
    accepted = set(inspect.signature(push_to_hub).parameters) - {"model", "repo_id", "save_kwargs"}

    @functools.wraps(original)
    def spectral_aware_push_to_hub(self, repo_id, *args, **kwargs):
        if not is_spectral_model(self):
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub() takes repo_id as its only positional argument.")
        kwargs.pop("max_shard_size", None)  # adapters are not sharded
        unknown = set(kwargs) - accepted
        if unknown:
            raise TypeError(f"push_to_hub() got unexpected keyword argument(s) {sorted(unknown)}.")
        return push_to_hub(self, repo_id, **kwargs)

    spectral_aware_push_to_hub._hf_spectral_original = original
    PeftModel.push_to_hub = spectral_aware_push_to_hub


def install_mixed_model_support(config_cls: type, model_cls: type, layer_cls: type) -> None:
    """Item 4 of the module doc; idempotent."""
    import typing

    from peft.tuners import mixed
    from peft.tuners.mixed import model as mixed_tuner

    owner = mixed_tuner.MixedModel
    if getattr(owner._create_and_replace, "_hf_spectral_original", None) is not None:
        return
    types = tuple(mixed_tuner.COMPATIBLE_TUNER_TYPES) + (SPECTRAL_PEFT_TYPE,)
    mixed_tuner.COMPATIBLE_TUNER_TYPES = types  # read by MixedModel's checks
    mixed.COMPATIBLE_TUNER_TYPES = types  # read by peft.mixed_model._check_config_compatible
    mixed_tuner.Configs = typing.Union[mixed_tuner.Configs, config_cls]  # isinstance(config, Configs.__args__)
    mixed_tuner.PREFIXES.append(PREFIX)  # which parameters train, which modules unload
    mixed_tuner.Layers = tuple(mixed_tuner.Layers) + (layer_cls,)  # which layers set_adapter reaches
    original = owner.__dict__["_create_and_replace"]

    @functools.wraps(original)
    def _create_and_replace(self, config, *args, **kwargs):
        if not isinstance(config, config_cls):
            return original(self, config, *args, **kwargs)
        if config.mode != "delta":
            raise ValueError(
                "A replace-mode spectral adapter cannot join a mixed model: it releases the dense weights the other "
                "adapters build on. Use mode='delta' there, or merge_and_unload() the mixed model first."
            )
        return model_cls._create_and_replace(self, config, *args, **kwargs)

    _create_and_replace._hf_spectral_original = original
    owner._create_and_replace = _create_and_replace


def install_hotswap_route(spectral_hotswap, is_spectral_adapter) -> None:
    """Item 6 of the module doc; idempotent. Both functions come from ``hf_spectral.hotswap``."""
    from peft.utils import hotswap

    original = hotswap.hotswap_adapter
    if getattr(original, "_hf_spectral_original", None) is not None:
        return

    @functools.wraps(original)
    def hotswap_adapter(model, model_name_or_path, adapter_name, torch_device=None, **kwargs):
        if is_spectral_adapter(model_name_or_path, **kwargs):
            return spectral_hotswap(model, model_name_or_path, adapter_name, torch_device, **kwargs)
        return original(model, model_name_or_path, adapter_name, torch_device=torch_device, **kwargs)

    hotswap_adapter._hf_spectral_original = original
    hotswap.hotswap_adapter = hotswap_adapter
