"""Byte sizes as people write and read them: '24GB' in, '1.50 GiB' out."""

from __future__ import annotations

import re

from fulltune.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}
MIB = 2**20


def parse_memory(text: str, what: str = "--memory_budget") -> int:
    """'24GB' -> 24e9 bytes, '512MiB' -> 512 * 2**20, '1.5g' -> 1.5 * 2**30; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what} '{text}': expected a size such as 24GB, 16GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float | None, digits: int = 2, missing: str = "-") -> str:
    """1536 -> '1.50 KiB'; binary units up to GiB; `missing` for None."""
    if n is None:
        return missing
    unit, size = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if abs(n) >= s), ("B", 1))
    return f"{n / size:.{digits}f} {unit}" if size > 1 else f"{int(n)} B"
