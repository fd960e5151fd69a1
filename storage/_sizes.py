"""Sizes as people write them ("20GB", "512MiB") and as messages show them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of "20GB", "500 MB", "1.5GiB", "4096" (decimal units; "iB": binary)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"not a size, {text!r}, write bytes with a unit such as 20GB or 512MiB")
    number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).upper()
    scale = _UNITS[unit]
    if suffix.startswith("I"):
        if not unit:
            raise ValueError(f"not a size, {text!r}, write bytes with a unit such as 20GB")
        scale = 1024 ** (" KMGT".index(unit))
    return int(number * scale)


def format_size(nbytes: int) -> str:
    """``nbytes`` rounded up to a tenth of its unit (what a limit must be at least)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= scale:
            return f"{-(-nbytes * 10 // scale) / 10:.1f}{unit}"
    return f"{nbytes}B"
