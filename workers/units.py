"""Byte sizes as people write them ("2GB", "512MiB", 3e9) and as we print them."""
from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """Return a byte count from an int, a float or a string like "2GB" / "1.5 GiB"; None stays None."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GB, 512MB, 1.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: int | float) -> str:
    """Human-readable size, decimal units (matches how budgets are written)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
