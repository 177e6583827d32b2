"""Sizes in bytes, read from and written for people: one table of units for
``memory_limit=``, ``keep_inputs=``, ``GRAPHEXEC_KEEP_INPUTS`` and the messages
and listings that print sizes."""

from __future__ import annotations

import math
import re

# kB/MB/GB are decimal, KiB/MiB/GiB binary; a bare K/M/G is binary, as in `ulimit`.
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_UNITS.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12})
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"(\d+(?:\.\d*)?(?:E[+-]?\d+)?)([A-Z]*)")


def parse_size(text: str) -> int | None:
    """Bytes in ``"4GB"``, ``"512 MiB"``, ``"1.5e9"``, ``"2g"``, ``"0"``; None if
    ``text`` is not a size."""
    found = _SIZE.fullmatch(text.strip().upper().replace(" ", ""))
    if found is None or found.group(2) not in _UNITS:
        return None
    value = float(found.group(1)) * _UNITS[found.group(2)]
    return int(value) if math.isfinite(value) else None  # ("1e400": no size)


def size_text(n: float, binary: bool = False) -> str:
    """``n`` bytes for people: ``1.5 GB``, ``300.0 kB``; with ``binary``, ``1.4 GiB``
    (where the number is compared with an RSS, which tools show in binary units)."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "kB", "MB", "GB"))
    for unit in units:
        if n < step:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= step
    return f"{n:.1f} {'TiB' if binary else 'TB'}"
