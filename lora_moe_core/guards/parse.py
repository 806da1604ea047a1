"""JSON and TOML readers with limits, for every file a user gives.

The standard parsers trust their input: 100,000 nested ``[`` raise RecursionError, and a 5,000-digit integer
raises ValueError (Python's int-to-string limit) or costs quadratic time; neither is a JSONDecodeError, so
callers showed a traceback; ``tomllib`` takes quadratic time in the parts of a dotted key (100,000 parts: minutes).
Here nesting, dotted-key parts, text size and integer digits are bounded before or while parsing,
and every failure is one UserError line naming the file (and line, for JSONL).
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

from lora_moe_core.errors import UserError

MAX_DEPTH = 64  # no config, manifest, label or prompt line of ours nests deeper than 4
MAX_INT_DIGITS = 64  # a seed or a step count fits in 20 digits
MAX_TEXT_BYTES = 256 * 1024 * 1024  # a manifest of a million clips is ~200 MB
MAX_KEY_PARTS = MAX_DEPTH  # a dotted key is nesting too: training.learning_rate has 2 parts
# The key of a `key = value` line or a `[table]` / `[[array]]` header: bare or quoted parts joined by dots.
# A line of an array or a string has a comma, a digit-led float or other characters before any `=` or `]`.
_KEY_HEAD = re.compile(r"""^\s*\[{0,2}\s*([A-Za-z0-9_\-."' ]+?)\s*(?:\]|=)""")


def _nesting(text: str) -> int:
    """Deepest bracket nesting outside strings (a scan, so the parser never recurses that deep)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case: no scan needed
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _key_parts(text: str) -> int:
    """Most parts of one dotted TOML key or table name (dots inside quoted parts do not count)."""
    if text.count(".") <= MAX_KEY_PARTS:  # the common case: no scan needed
        return 0
    most = 0
    for line in text.splitlines():
        if line.count(".") < MAX_KEY_PARTS or not (found := _KEY_HEAD.match(line)):
            continue
        dots, quote = 0, ""
        for char in found[1]:
            if quote:
                quote = "" if char == quote else quote
            elif char in "\"'":
                quote = char
            else:
                dots += char == "."
        most = max(most, dots + 1)
    return most


def _bounded_int(where: str):
    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise UserError(f"{where}: integer with {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
        return int(digits)

    return parse_int


def _check_size(text: str, where: str) -> None:
    if len(text) > MAX_TEXT_BYTES:
        raise UserError(f"{where}: {len(text):,} characters, over the limit of {MAX_TEXT_BYTES:,}")


def load_json(text: str, where: str) -> Any:
    """One JSON document (or JSONL line) with the limits above.

    Raises:
        UserError: ``<where>: not valid JSON (...)``, nested too deep, an integer with too many digits, too large.
    """
    _check_size(text, where)
    if _nesting(text) > MAX_DEPTH:
        raise UserError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int(where))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:
        raise UserError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def json_or_text(text: str, where: str) -> Any:
    """``text`` parsed as JSON when it is JSON (a number, a list, ``true``), else ``text`` itself: a
    ``name=value`` flag. The limits of :func:`load_json` hold either way.

    Raises:
        UserError: nested too deep or an integer with too many digits (never "not valid JSON").
    """
    _check_size(text, where)
    if _nesting(text) > MAX_DEPTH:
        raise UserError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int(where))
    except (json.JSONDecodeError, RecursionError):
        return text


def load_toml(text: str, where: str) -> dict[str, Any]:
    """A TOML document with the limits above (an integer past Python's 4,300 digits is a one-line error too).

    Raises:
        UserError: ``<where>: invalid TOML: ...``, nested too deep, too large.
    """
    _check_size(text, where)
    if _nesting(text.replace("'", '"')) > MAX_DEPTH:
        raise UserError(f"{where}: TOML nested deeper than {MAX_DEPTH} levels")
    if (parts := _key_parts(text)) > MAX_KEY_PARTS:
        raise UserError(f"{where}: a dotted TOML key of {parts:,} parts (at most {MAX_KEY_PARTS})")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where}: invalid TOML: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise UserError(f"{where}: invalid TOML ({type(exc).__name__}: {str(exc)[:80]})") from None
