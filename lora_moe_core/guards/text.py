"""Free text a user gives (captions, prompts, negative prompts): what a model may learn from or be conditioned on.

Also: :func:`decode_utf8`, the one UTF-8 reading of text files (dataset lists, labels, configs, prompts).

Refused: control characters but tab and line breaks (a NUL, a bell, an ANSI escape that recolours a terminal),
bidirectional overrides and isolates (U+202A–U+202E, U+2066–U+2069: "Trojan Source" text that displays other
than it reads), and lone surrogates (``"\\ud800"`` in JSON decodes to one; it cannot be written as UTF-8).
"""

from __future__ import annotations

import unicodedata

from lora_moe_core.errors import UserError

#: Longest caption or prompt accepted: twice what UMT5's 512 tokens hold in English (~4 characters a token).
MAX_TEXT_CHARS = 4096
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}  # multi-line caption files, CRLF from Windows editors
_BIDI = {chr(code) for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def text_problem(text: str) -> str | None:
    """Why ``text`` is refused (control, bidi or surrogate character and where), or None."""
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cc" and char not in _ALLOWED_CONTROLS:
            return f"holds control character U+{ord(char):04X} at character {index}"
        if char in _BIDI:
            return f"holds bidirectional override U+{ord(char):04X} at character {index}"
        if category == "Cs":
            return f"holds a lone surrogate U+{ord(char):04X} at character {index} (not valid Unicode text)"
    return None


def check_text(text: str, where: str, what: str = "caption", limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` stripped, or a one-line UserError naming ``where`` when it is too long or holds a refused
    character. Empty text is the caller's decision (an empty negative prompt is valid, an empty prompt is not)."""
    text = text.strip()
    if len(text) > limit:
        raise UserError(f"{where}: {what} has {len(text)} characters, over the limit of {limit} (UMT5 reads 512 "
                        "tokens, about 2,000 English characters); shorten it")  # fmt: skip
    problem = text_problem(text)
    if problem:
        raise UserError(f"{where}: {what} {problem}; remove it")
    return text


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text (a leading BOM dropped); UserError naming ``what`` and the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                        f"(line {line}); re-save it as UTF-8") from None  # fmt: skip
