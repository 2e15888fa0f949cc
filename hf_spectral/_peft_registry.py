"""The one place that reaches into PEFT's internals, and the list of what ``import hf_spectral`` changes
in PEFT's classes.

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
   (``hf_spectral.loading``); other adapters load as before (``tests/test_loading.py``).

The tests fail loudly if a peft release changes any of this.
"""

from __future__ import annotations

import enum
import functools
import inspect

from peft.utils import PeftType

from ._names import NAME, PEFT_KEY_PREFIX, PREFIX  # noqa: F401 - re-exported: the tuner and the loader read them here


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
