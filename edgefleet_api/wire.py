"""How values look on the wire: times, quantities, milliseconds and rounding.

The typed models (`edge_node`, `inference_service`, `model_spec`, `conditions`) hold SI units
(seconds, bytes) and epoch or RFC 3339 times; their `from_obj`/`to_obj` convert with these
helpers, and nothing else in the code base converts milliseconds or rounds a reported number.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

Obj = Mapping[str, Any]
"""An object as the API's JSON has it."""

MS_DIGITS = 3
"""Milliseconds are written with three decimals (microseconds): finer is noise, and a status diff
must not chase it."""
RATE_DIGITS = 3
"""Requests per second, three decimals."""
FRACTION_DIGITS = 5
"""Error rates, five decimals."""
CELSIUS_DIGITS = 1
"""Temperatures, a tenth of a degree (what NVML and thermal zones resolve)."""
WATTS_DIGITS = 1
UTILIZATION_DIGITS = 3

_QUANTITY_RE = re.compile(
    r"^(?P<sign>[+-]?)(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<binary>[KMGTPE]i)|(?P<decimal>[numkMGTPE])|[eE](?P<exponent>[+-]?[0-9]+))?$"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def mapping(value: Any, where: str) -> Obj:
    """`value` if it is a JSON object, else ValueError naming `where`."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is not an object")
    return value


def required(obj: Obj, key: str, where: str = "") -> Any:
    """obj[key], or ValueError 'missing field' naming it."""
    if key not in obj or obj[key] is None:
        raise ValueError(f"missing field {where}{key!r}")
    return obj[key]


def ms_to_s(value: Any) -> float | None:
    """A wire value in milliseconds -> seconds (None stays None). TypeError/ValueError if it is
    not a number."""
    if value is None:
        return None
    return _number(value) / 1000.0


def s_to_ms(value: float | None) -> float | None:
    """Seconds -> milliseconds as written on the wire (MS_DIGITS decimals)."""
    return None if value is None else round(value * 1000.0, MS_DIGITS)


def rounded(value: float | None, digits: int) -> float | None:
    """A reported number rounded to `digits`; None (and NaN or infinity: not reportable) -> None."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def optional_float(value: Any) -> float | None:
    return None if value is None else _number(value)


def optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def rfc3339(epoch_s: float) -> str:
    """Epoch seconds -> metav1.Time (UTC, whole seconds)."""
    return dt.datetime.fromtimestamp(int(epoch_s), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(epoch_s: float) -> str:
    """Epoch seconds -> metav1.MicroTime (UTC, microseconds: Lease renewTime)."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> float | None:
    """RFC 3339 (metav1.Time or MicroTime) -> epoch seconds; None or '' -> None."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def parse_quantity(value: str | int | float | None) -> int:
    """A Kubernetes quantity ('512Mi', '1G', '1.5Gi', '100m', '1e3', 1024) -> an integer, rounded up
    as apimachinery's `Value()` does; None -> 0. ValueError for anything else."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return math.ceil(value)
    m = _QUANTITY_RE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 512Mi, 2G, 1024)")
    try:
        number = Decimal(m["number"])
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None
    if m["binary"]:
        number *= Decimal(1024) ** _BINARY[m["binary"]]
    elif m["decimal"]:
        number = number.scaleb(_DECIMAL[m["decimal"]])
    elif m["exponent"]:
        number = number.scaleb(int(m["exponent"]))
    if m["sign"] == "-":
        number = -number
    return math.ceil(number)
