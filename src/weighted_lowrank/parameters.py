"""Checks of Kedro parameter blocks, shared by the nodes so every pipeline words errors alike."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_keys(
    block: str, values: Mapping[str, Any], allowed: Iterable[str], hint: str = ""
) -> None:
    """Raise if ``values`` (the parameter block ``block``) has keys outside ``allowed``."""
    allowed = list(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"parameters {block} has unknown keys {unknown}; expected {allowed}{hint}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise unless ``value`` (parameter ``name``) is an int ≥ 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"parameter {name}={value!r}: expected a positive int"
            + (" or null" if allow_none else "")
        )


def check_bool(name: str, value: Any) -> None:
    """Raise unless ``value`` (parameter ``name``) is true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name}={value!r}: expected true or false")
