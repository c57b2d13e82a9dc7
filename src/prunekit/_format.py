"""Human-readable numbers for tables and reports: ``1.2M``, ``3.4 MFLOPs``, ``5.6 MiB``, ``231 µs``, ``9.3×``."""

from __future__ import annotations

import math

__all__ = ["format_count", "format_bytes", "format_seconds", "format_ratio", "format_percent"]

_DECIMAL = ["", "K", "M", "G", "T", "P"]
_BINARY = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def format_count(n: float, unit: str = "", digits: int = 1) -> str:
    """``1234567 -> "1.2M"``; with ``unit="FLOPs"``: ``"1.2 MFLOPs"``. Decimal (powers of 1000) prefixes."""
    if n is None:
        return "-"
    if not math.isfinite(n):
        return f"{n} {unit}".strip()
    magnitude = 0
    value = float(n)
    while abs(value) >= 1000 and magnitude < len(_DECIMAL) - 1:
        value /= 1000
        magnitude += 1
    number = f"{int(value)}" if magnitude == 0 and float(n).is_integer() else f"{value:.{digits}f}"
    if not unit:
        return number + _DECIMAL[magnitude]
    return f"{number} {_DECIMAL[magnitude]}{unit}"


def format_bytes(n: float, digits: int = 1) -> str:
    """``1536 -> "1.5 KiB"``. Binary (powers of 1024) prefixes."""
    magnitude = 0
    value = float(n)
    while abs(value) >= 1024 and magnitude < len(_BINARY) - 1:
        value /= 1024
        magnitude += 1
    if magnitude == 0:
        return f"{int(value)} B"
    return f"{value:.{digits}f} {_BINARY[magnitude]}"


def format_seconds(s: float | None, digits: int = 3) -> str:
    """``0.000231 -> "231 µs"`` (``digits`` significant digits); ``None -> "-"``."""
    if s is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(s) >= scale:
            return f"{s / scale:.{digits}g} {unit}"
    return f"{s / 1e-9:.{digits}g} ns"


def format_ratio(value: float | None, digits: int = 1) -> str:
    """A ratio: ``9.32 -> "9.3×"``; infinity prints as ``"∞"``, ``None`` as ``"-"``."""
    if value is None:
        return "-"
    return "∞" if math.isinf(value) else f"{float(value):.{digits}f}×"


def format_percent(value: float | None, digits: int = 1) -> str:
    """``0.9123 -> "91.2%"``; ``None -> "-"``."""
    return "-" if value is None else f"{float(value):.{digits}%}"
