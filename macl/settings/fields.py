"""Typed settings: every field of a config dataclass is coerced to its declared type or rejected by name.

Each config dataclass (``NetConfig``, ``MethodConfig``, ``OptimConfig``, ``TrainConfig``, ``FinetuneConfig``,
``SemiConfig``, ``PreprocessConfig``, ``PretrainDataConfig``) calls :func:`coerce_fields` first in its
``__post_init__``, so its range checks only ever see values of the right type. Rules:

- ``int``: ints and NumPy integers; integral floats (``2.0``); 0-d tensors / NumPy scalars by their value;
  ``2.7``, ``"fast"``, ``True`` are rejected.
- ``float``: any real number (NumPy scalars and 0-d tensors too), which must be finite (``inf`` / ``nan``
  rejected); strings and booleans are rejected.
- ``bool``: ``True`` / ``False`` only (``"maybe"`` is rejected).
- ``str``: strings only. ``Optional[X]``: None or X. ``tuple[X, ...]`` / ``list[X]``: a list or tuple whose
  items are coerced to X. Nested config dataclasses and untyped fields are left to their own checks.

Also here: :func:`check_labels_fraction` (shared by fine-tuning and ARCO) and :func:`require_yaml` (the optional
``macl[yaml]`` extra).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Union

_NONE = type(None)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated: leave that class's values alone
        return {}


def field_types(cls: type) -> dict:
    """``{field name: declared type}`` of a config dataclass (what :func:`coerce_fields` enforces)."""
    hints = _hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def _scalar(value: Any) -> Any:
    """NumPy scalars and 0-d tensors / arrays as Python numbers; anything else unchanged."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _reject(name: str, what: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {what}, got {value!r}")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp`` (see the module docstring); raises ValueError naming ``name`` otherwise."""
    if tp is None or tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None:
            if _NONE in args:
                return None
        options = [a for a in args if a is not _NONE]
        errors = []
        for option in options:
            try:
                return coerce(value, option, name)
            except ValueError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0] if value is not None else _reject(name, "set (None is not allowed)", value)
        raise _reject(name, " or ".join(_type_name(o) for o in options), value)
    if dataclasses.is_dataclass(tp):
        return value  # a nested config (or its dict form): checked by its own __post_init__
    if tp is bool:
        v = _scalar(value)
        if isinstance(v, bool):
            return v
        raise _reject(name, "true or false", value)
    if tp is int:
        v = _scalar(value)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _reject(name, "an integer", value)
        if isinstance(v, numbers.Integral):
            return int(v)
        if math.isfinite(float(v)) and float(v) == int(v):
            return int(v)
        raise _reject(name, "an integer", value)
    if tp is float:
        v = _scalar(value)
        if isinstance(v, str):  # "inf" / "nan" / "1e-3" from a command line
            try:
                v = float(v)
            except ValueError:
                raise _reject(name, "a number", value) from None
            if not math.isfinite(v):
                raise _reject(name, "a finite number", value)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _reject(name, "a number", value)
        if not math.isfinite(float(v)):
            raise _reject(name, "a finite number", value)
        return float(v)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _reject(name, "a string", value)
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str) and (tp is list or origin is list):
            return value  # a comma-separated list, split by the dataclass itself (e.g. method.meta_labels)
        if not isinstance(value, (list, tuple)):
            raise _reject(name, "a list", value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _reject(name, f"a list of {len(args)} values", value)
            items = [coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        elif args:
            items = [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (tp is tuple or origin is tuple) else items
    return value


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def coerce_fields(obj: Any, prefix: str = "") -> None:
    """Coerce every field of the dataclass instance ``obj`` to its declared type, in place.

    ``prefix`` (e.g. ``"optim."``) goes in front of field names in error messages.

    Raises:
        ValueError: ``"<prefix><field> must be <type>, got <value>"`` for the first field that does not fit.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints.get(f.name)
        if tp is None:
            continue
        old = getattr(obj, f.name)
        new = coerce(old, tp, prefix + f.name)
        if new is not old:
            object.__setattr__(obj, f.name, new)


def check_labels_fraction(value: Any, name: str = "labels_fraction") -> None:
    """A label budget must be in (0, 1]; 0 would silently mean "no labels" (refused, named)."""
    if value is not None and not 0 < value <= 1:
        hint = "; 0 labels cannot train a segmentation network" if value == 0 else ""
        raise ValueError(f"{name} must be in (0, 1], got {value!r}{hint}")


def require_yaml(path: Any) -> None:
    """Raise a one-line ValueError when a YAML file is given but PyYAML (the ``macl[yaml]`` extra) is missing."""
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: reading YAML needs PyYAML: pip install 'macl[yaml]' (or pyyaml), or use a "
                         f".toml / .json file") from None


__all__ = ["coerce", "coerce_fields", "field_types", "check_labels_fraction", "require_yaml"]
