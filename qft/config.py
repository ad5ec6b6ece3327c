"""Build a config dataclass from a mapping (YAML or Python), with one-line errors for unknown keys and bad types.

Every qft config (FinetuneConfig, EvalConfig, ...) goes through :func:`config_from_dict`, so that a mistyped
key names the closest option and a value of the wrong type is refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib

from qft.errors import QftError


def config_from_dict(cls, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise QftError(f"unknown config key {key!r}",
                           f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(names))}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(**{key: _coerce(key, value, types[key]) for key, value in values.items()})


def _coerce(key: str, value, annotation: str):
    """Check a value against its field's annotation (int, float, bool, str, optionally | None)."""
    if value is None and "None" in annotation:
        return None
    base = annotation.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)}.get(base)
    if ok is None or ok(value):
        return str(value) if base == "str" and not isinstance(value, str) else value
    raise QftError(f"config key {key!r} must be {'an' if base == 'int' else 'a'} {base}, got {value!r}",
                   f"give {key} a {base} value")
