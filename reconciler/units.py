"""Quantities: "512MiB", "10GiB", "500MB", "2G" or an integer of bytes <-> bytes, both directions."""
from __future__ import annotations

import re

_IEC = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "PiB": 1024**5,
        "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5}
_SI = {"B": 1, "": 1, "KB": 10**3, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
       "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_UNITS = {**_SI, **_IEC}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*\Z")
# No target holds more than a signed 64-bit count of bytes; a larger quantity is a typo, not a size.
MAX_BYTES = 2**63 - 1


class UnitError(ValueError):
    """A quantity that cannot be read; the message is meant for the user."""


def parse_bytes(value: object) -> int:
    """Bytes from an int or a string with a unit; SI units are powers of 10, IEC of 1024."""
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        if value <= 0:
            raise UnitError(f"{value} must be greater than zero")
        if value > MAX_BYTES:
            raise UnitError(f"{value} is too large (at most {MAX_BYTES} bytes)")
        return value
    if not isinstance(value, str):
        raise UnitError(f"{value!r} is not a quantity")
    m = _QUANTITY.match(value)
    if not m or m.group(2) not in _UNITS:
        raise UnitError(f"{value!r} is not a quantity (use a number with a unit such as 512MiB, 10GiB, 500MB)")
    number, unit = m.group(1), m.group(2)
    if len(number) > 40:
        raise UnitError(f"{value[:20]!r}... is too large (at most {MAX_BYTES} bytes)")
    if "." in number:
        whole, frac = number.split(".")
        scale = 10 ** len(frac)
        total = (int(whole) * scale + int(frac)) * _UNITS[unit]
        if total % scale:
            raise UnitError(f"{value!r} is not a whole number of bytes")
        result = total // scale
    else:
        result = int(number) * _UNITS[unit]
    if result <= 0:
        raise UnitError(f"{value!r} must be greater than zero")
    if result > MAX_BYTES:
        raise UnitError(f"{value!r} is too large (at most {MAX_BYTES} bytes)")
    return result


def format_bytes(n: int) -> str:
    """The shortest exact IEC spelling: 536870912 -> "512MiB"; sizes not a whole KiB stay bytes."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = _IEC[unit]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
