"""The one place that reaches into PEFT's internals: adding SPECTRAL to its method registry.

PEFT (checked on 0.21) registers a method with ``peft.utils.register_peft_method``, which fills
its config, tuner and prefix mappings, but only for names that are members of the ``PeftType``
enum. Python enums are closed, so the member is added here from outside, through the enum's
member maps. ``tests/test_peft_registry.py`` fails loudly if a peft release changes any of this.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

NAME = "spectral"
PREFIX = "spectral_"


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
