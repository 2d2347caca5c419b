"""Sizes as admins write them: bytes, or ``512M`` / ``1G`` (the spelling of JupyterHub's
``ByteSpecification`` and its ``MEM_LIMIT``), parsed once and validated when a trait is set."""

from __future__ import annotations

import re
from typing import Any

from traitlets import TraitError, Unicode

_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(value: Any) -> int | None:
    """``"512m"`` / ``"1.5G"`` / ``536870912`` → bytes; ``None``, ``0`` or ``""`` → None (unlimited)."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT])?[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size: use bytes or a number with K, M, G or T")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    return int(number * _UNITS.get(unit, 1)) or None


class ByteSpecification(Unicode):
    """A memory/disk size trait: bytes or ``512M``/``1G``; validated when set."""

    info_text = "a size in bytes or with a K/M/G/T suffix (empty or 0: unlimited)"

    def validate(self, obj: Any, value: Any) -> str:
        if isinstance(value, int | float):
            value = str(int(value))
        value = super().validate(obj, value)
        try:
            parse_bytes(value)
        except ValueError as e:
            raise TraitError(str(e)) from None
        return value
