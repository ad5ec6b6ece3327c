"""Register qft's fine-tuning methods as first-class PEFT methods, with stock peft.

peft's ``register_peft_method`` (peft 0.21) refuses any name that is not already a member of the
``PeftType`` enum, and ``PeftConfig``/``PeftModel.from_pretrained`` resolve a saved adapter through that
same enum. An out-of-tree method therefore needs a ``PeftType`` member. This module is the one place
that adds one: it extends the enum in memory (never peft's files on disk), then calls peft's own
``register_peft_method`` so that every peft mapping is filled exactly as for an in-tree method.

Usage (inside ``qft/adapters/<method>/__init__.py``)::

    register_method(name="peqa", config_cls=PeqaConfig, model_cls=PeqaModel)
"""

from __future__ import annotations

import enum

from peft.utils import peft_types
from peft.utils.peft_types import PeftType

__all__ = ["add_peft_type", "register_method", "registered_methods"]

_REGISTERED: dict[str, type] = {}


def add_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member called ``name.upper()``, adding it to the enum if absent.

    ``PeftType`` is a ``str`` enum whose value equals its name. A member is built the way ``enum``
    builds one (``str.__new__`` + ``_name_``/``_value_``) and entered into the three tables that lookups
    by name (``PeftType.X``, ``PeftType["X"]``), by value (``PeftType("X")``) and iteration
    (``list(PeftType)``) read. Idempotent.
    """
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    # ``enum``'s own __setattr__ forbids new attributes that look like members; go around it, as
    # ``EnumType.__new__`` itself does when it creates the class.
    type.__setattr__(PeftType, key, member)
    assert isinstance(PeftType(key), enum.Enum) and PeftType[key] is member
    return member


def register_method(*, name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> None:
    """Register a qft method with peft, so ``get_peft_model``/``save_pretrained``/``from_pretrained`` work.

    Safe to call twice for the same classes (re-imports); a different class under a taken name is an error.
    """
    if name in _REGISTERED:
        if _REGISTERED[name] is not config_cls:
            raise ValueError(f"A PEFT method named {name!r} is already registered by {_REGISTERED[name]!r}.")
        return
    peft_type = add_peft_type(name)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not config_cls:
        raise ValueError(f"peft already has a method named {name!r}; pick another name for the qft method.")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        peft_types.register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    _REGISTERED[name] = config_cls


def registered_methods() -> dict[str, type]:
    """The qft methods registered with peft in this process, name → config class."""
    return dict(_REGISTERED)
