"""Numeric flags and settings: finite and inside their range, with the same limits wherever they are given.

``float("nan")`` compares False with everything, so a bare ``value < 0`` check lets NaN through; these checks
are written so that NaN and ±inf always fail.
"""

from __future__ import annotations

import math

from lora_moe_core.errors import UserError


def check_number(name: str, value: float, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None) -> float:  # fmt: skip
    """``value`` when it is a finite number within the bounds given; else a one-line UserError naming ``name``.

    Raises:
        UserError: ``<name> must be a finite number >= 0, got nan``.
    """
    wanted = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]  # fmt: skip
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (at_least is None or value >= at_least) and (above is None or value > above)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        bounds = " and ".join(part for part in wanted if part)
        raise UserError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return value


def check_int(name: str, value: int, low: int, high: int) -> int:
    """``value`` when it is an integer in ``[low, high]``; else a one-line UserError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value
