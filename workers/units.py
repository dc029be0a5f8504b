"""Byte sizes as people write them ("2GB", "512MiB", 3e9) and as we print them.

One convention everywhere: decimal prefixes are powers of 1000 (KB = 10**3, MB = 10**6,
GB = 10**9, TB = 10**12; the bare letters K, M, G, T mean the same), binary prefixes are
powers of 1024 (KiB = 2**10, MiB = 2**20, GiB = 2**30, TiB = 2**40; "Ki", "Mi", "Gi", "Ti" too).
Case does not matter. This is the only parser and the only formatter of sizes in moeshard.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

_DECIMAL = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_UNITS = {"": 1, "B": 1,
          **{u[0]: m for u, m in _DECIMAL}, **{u: m for u, m in _DECIMAL},
          **{u[:2].upper(): m for u, m in _BINARY}, **{u.upper(): m for u, m in _BINARY}}
_SIZE = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(value: int | float | str | None) -> int | None:
    """Return a byte count from an int, a float or a string like "2GB" / "1.5 GiB"; None stays None.

    Fractions of a byte are dropped ("1.5KiB" is 1536, "0.1KB" is 100). Negative sizes, booleans
    and unknown units are refused with a ValueError that shows what to write instead.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GB, 512MiB or a number of bytes")
    if isinstance(value, int):
        number, unit = Decimal(value), ""
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GB, 512MiB or a number of bytes")
        number, unit = Decimal(repr(value)), ""
    else:
        m = _SIZE.fullmatch(str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GB, 512MB, 1.5GiB or a number of "
                             "bytes (KB/MB/GB = powers of 1000, KiB/MiB/GiB = powers of 1024)")
        number, unit = Decimal(m.group(1)), m.group(2).upper()
    if number < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}; write e.g. 2GB or 512MiB")
    return int(number * _UNITS[unit])


def _exact(n: int, unit: int) -> str | None:
    """n / unit written with at most 3 decimals if that is exact, else None."""
    milli, rest = divmod(n * 1000, unit)
    if rest:
        return None
    whole, frac = divmod(milli, 1000)
    return f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)


def format_bytes(n: int | float) -> str:
    """A size the way a user would have written it.

    The rule: below 1000 bytes, plain bytes ("512 B"). Otherwise the value is written in the
    largest decimal unit (KB/MB/GB/TB) and the largest binary unit (KiB/MiB/GiB/TiB) it reaches;
    of the two, the one that is exact with at most 3 decimals wins, the shorter if both are, the
    decimal one on a tie ("2 GB", "3 MiB", "1.5 GiB", "19.008 KB"). When neither is exact (or `n`
    is a fractional float such as a rate) the decimal form is rounded to 2 decimals ("3.15 MB").
    So a budget given as "3MiB" prints "3 MiB" and one given as "3MB" prints "3 MB".
    """
    sign, a = ("-", -n) if n < 0 else ("", n)
    whole = float(a).is_integer()
    if a < 1000:
        return f"{sign}{a:.0f} B" if whole else f"{sign}{a:.2f} B"
    dec_name, dec = next((u, m) for u, m in _DECIMAL if a >= m)
    if whole:
        units = [(dec_name, dec)] + [(u, m) for u, m in _BINARY if a >= m][:1]
        exact = [(len(t), i, f"{t} {u}") for i, (u, m) in enumerate(units) if (t := _exact(int(a), m)) is not None]
        if exact:
            return sign + min(exact)[2]
    return f"{sign}{a / dec:.2f} {dec_name}"
