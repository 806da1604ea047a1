"""Label captions and prompts with instrument families from Chinese and English keywords.

Matching rules:

* Every term is a plain word or phrase that maps to one family. Verbs work like nouns
  ("剪断", "cut" → Scissors; "吸引", "irrigate" → Suction).
* **Longest match first over the whole text**, without overlaps: "钩剪" (hook scissors) beats "钩"/"剪",
  "冲洗吸引器" beats "吸引", "肝拉钩" (liver retractor) beats anything inside it.
* English is case-insensitive, with ASCII word boundaries (not ``\\b``, which counts Chinese
  characters as word characters and so would miss "用hook分离"). A space or hyphen inside a term
  matches any run of spaces/hyphens, or none ("L-hook", "L hook", "Lhook"); a term ending in a
  letter also matches with a trailing "s"/"es" ("hooks", "graspers", "cuts"). Chinese matches by substring.
* Traps are handled by longer terms, not special cases: 拉钩/肝拉钩 → Other; 钩剪, "hook scissors" →
  Scissors; 双极, 双极电凝(钳), "bipolar coagulation" → Other; 超声刀, "ultrasonic/harmonic shears" → Other.
* One context rule: bare energy words (电凝, 电灼, cautery, cauterize, coagulate, …) mean the
  monopolar hook, unless 双极/"bipolar" appears anywhere in the same text; then they belong to
  the bipolar mention and count as Other.
* "Ignore" terms consume text but name no family. 腹腔镜(下), 镜头, "laparoscopic", "laparoscope"
  name the procedure or the camera, which is never visible in its own video, so they are not
  instruments (unlike the reference table's Other row). "腹腔镜剪" is still Scissors (longer match).

User vocabulary file (TOML), one ``[terms]`` table keyed by family (case-insensitive), plus the
optional ``Ignore`` key::

    [terms]
    Scissors = ["新剪", "micro scissors"]
    Other = ["endo bag"]
    Ignore = ["钩住"]

A user term that already exists moves to the user's family (user wins).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES, FAMILY_TABLE, IGNORED_TERMS, NUM_FAMILIES
from lora_moe_core.guards.files import read_regular_bytes
from lora_moe_core.guards.parse import load_toml
from lora_moe_core.guards.text import decode_utf8

if TYPE_CHECKING:
    import torch

#: Pseudo-family for terms that consume text but name no visible instrument.
IGNORE = "Ignore"
_VALID_KEYS: tuple[str, ...] = (*FAMILIES, IGNORE)

BUILTIN_TERMS: dict[str, tuple[str, ...]] = {
    **{entry.name: entry.terms for entry in FAMILY_TABLE},
    IGNORE: IGNORED_TERMS,
}


def _key(term: str) -> str:
    """Identity of a term: case-folded, with space/hyphen runs collapsed (they match alike)."""
    return " ".join(re.split(r"[\s\-]+", term.strip().casefold())).strip()


# Bare energy words that mean the monopolar hook unless the text also mentions a bipolar device.
_BIPOLAR_SENSITIVE = frozenset(
    _key(t) for t in ("电凝", "电灼", "cautery", "cauterize", "cauterizing", "cauterized", "cauterise",
                      "cauterising", "coagulate", "coagulating", "coagulated", "coagulation",
                      "electrocoagulation")
)  # fmt: skip
_DEVICE_VERBS = frozenset(_key(t) for t in ("cut", "cutting"))  # Scissors verbs an energy device also does
_BIPOLAR_MARKER = re.compile(r"双极|(?<![A-Za-z0-9])bipolar", re.IGNORECASE)
# Energy devices that look like forceps: routed as Other, flagged as `energy` side label (reference §4).
_ENERGY = frozenset(
    _key(t) for t in BUILTIN_TERMS["Other"]
    if t.startswith(("双极", "超声刀", "结扎速", "血管闭合器", "bipolar", "harmonic", "ultrasonic", "LigaSure",
                     "vessel sealer"))
)  # fmt: skip

_ASCII_ALNUM = "A-Za-z0-9"


def _pattern(term: str) -> re.Pattern[str]:
    """Compile one term; ASCII boundaries only where the term itself starts/ends with ASCII."""
    body = r"[\s\-]*".join(re.escape(p) for p in re.split(r"[\s\-]+", term.strip()) if p)
    head = f"(?<![{_ASCII_ALNUM}])" if re.match(f"[{_ASCII_ALNUM}]", term.strip()) else ""
    tail = ""
    if re.search(r"[A-Za-z]$", term.strip()):
        tail = f"(?:e?s)?(?![{_ASCII_ALNUM}])"  # plural / 3rd person: hooks, graspers, cuts
    elif re.search(r"[0-9]$", term.strip()):
        tail = f"(?![{_ASCII_ALNUM}])"
    return re.compile(head + body + tail, re.IGNORECASE)


@dataclass
class LabelMatch:
    """Result of :meth:`Vocabulary.match`.

    families: matched families in FAMILIES order, deduplicated ([] when none).
    matched: the matched text spans (as written in the text), in text order; Ignore terms excluded.
    probs: NUM_FAMILIES floats, uniform over ``families``, or uniform 1/NUM_FAMILIES when none.
    energy: True when an energy device routed as Other (bipolar, 超声刀, LigaSure, …) was mentioned.
    """

    families: list[str]
    matched: list[str]
    probs: list[float]
    energy: bool = False


@dataclass(frozen=True)
class _Hit:
    start: int
    end: int
    family: str
    energy: bool


class Vocabulary:
    """A family → terms vocabulary with longest-match-first labelling (see module docstring)."""

    def __init__(self, terms: Mapping[str, Sequence[str]] | None = None):
        # key -> (family, spelling as given); insertion-ordered so compilation is deterministic.
        self._terms: dict[str, tuple[str, str]] = {}
        self._compiled: list[tuple[re.Pattern[str], str, str]] | None = None
        if terms:
            self.extend(terms)

    @classmethod
    def from_builtin(cls) -> Vocabulary:
        """A fresh vocabulary holding the built-in zh/en terms (safe to extend)."""
        return cls(BUILTIN_TERMS)

    @classmethod
    def load(cls, extra_toml_path: str | Path | None = None) -> Vocabulary:
        """The built-in vocabulary extended by a user TOML file (``[terms] Family = [...]``).

        Raises UserError (one line) for an unreadable or malformed file, an unknown family key
        or a value that is not a list of non-empty strings.
        """
        vocab = cls.from_builtin()
        if extra_toml_path is None:
            return vocab
        path = Path(extra_toml_path)
        text = decode_utf8(read_regular_bytes(path, "vocabulary file"), f"vocabulary file {path}")
        data = load_toml(text, f"malformed vocabulary file {path}")
        extra = set(data) - {"terms"}
        if extra or not isinstance(data.get("terms"), dict):
            found = ", ".join(sorted(extra)) or "nothing"
            raise UserError(
                f'vocabulary file {path}: expected one [terms] table (e.g. Scissors = ["..."]), found {found}; '
                f"valid keys in [terms]: {', '.join(_VALID_KEYS)}"
            )
        return vocab.extend(data["terms"], source=f"vocabulary file {path}")

    def extend(self, extra: Mapping[str, Sequence[str]], *, source: str = "vocabulary") -> Vocabulary:
        """Add terms in place (family keys case-insensitive, plus ``Ignore``); returns self.

        An existing term is reassigned to the new family, so users can override built-ins.
        """
        for name, terms in extra.items():
            family = _canonical(name, _VALID_KEYS)
            if family is None:
                raise UserError(f"{source}: unknown family {name!r}; valid: {', '.join(_VALID_KEYS)}")
            # A bare string is a Sequence too; reject it rather than adding its characters.
            if isinstance(terms, str | bytes) or not isinstance(terms, Sequence):
                raise UserError(f"{source}: {name} must be a list of strings, got {type(terms).__name__}")
            for term in terms:
                if not isinstance(term, str) or not _key(term):
                    raise UserError(f"{source}: {name} has an empty or non-string term {term!r}")
                key = _key(term)
                self._terms.pop(key, None)  # re-insert so the new family wins
                self._terms[key] = (family, term.strip())
        self._compiled = None
        return self

    def terms(self, family: str) -> list[str]:
        """The terms of one family (or Ignore), in insertion order, as spelled when added."""
        return [t for f, t in self._terms.values() if f == family]

    def match(self, text: str) -> LabelMatch:
        """Label ``text`` with the families of the instruments it mentions."""
        hits = self._scan(text)
        found = {h.family for h in hits}
        families = [f for f in FAMILIES if f in found]
        if families:
            probs = [1.0 / len(families) if f in found else 0.0 for f in FAMILIES]
        else:
            probs = [1.0 / NUM_FAMILIES] * NUM_FAMILIES
        return LabelMatch(
            families=families,
            matched=[text[h.start : h.end] for h in hits],
            probs=probs,
            energy=any(h.energy for h in hits),
        )

    def _scan(self, text: str) -> list[_Hit]:
        """Non-overlapping family hits in text order (Ignore hits consume text, then are dropped)."""
        if self._compiled is None:
            self._compiled = [(_pattern(t), f, k) for k, (f, t) in self._terms.items()]
        candidates = [
            (m.start(), m.end(), family, key)
            for pattern, family, key in self._compiled
            for m in pattern.finditer(text)
            if m.end() > m.start()
        ]
        candidates.sort(key=lambda c: (c[0] - c[1], c[0]))  # longest first, then leftmost
        taken = [False] * len(text)
        kept = []
        for start, end, family, key in candidates:
            if any(taken[start:end]):
                continue
            taken[start:end] = [True] * (end - start)
            if family != IGNORE:
                kept.append((start, end, family, key))
        # Energy devices that look like forceps (bipolar, harmonic shears, LigaSure, …) also coagulate and cut:
        # with one named, bare energy words and "cut" describe that device, not a hook or scissors.
        device = _BIPOLAR_MARKER.search(text) is not None or any(key in _ENERGY for *_, key in kept)
        hits = []
        for start, end, family, key in kept:
            borrowed = device and (key in _BIPOLAR_SENSITIVE or key in _DEVICE_VERBS)
            hits.append(_Hit(start, end, "Other" if borrowed else family, borrowed or key in _ENERGY))
        hits.sort(key=lambda h: h.start)
        return hits

    def _resolve_alias(self, alias: str) -> str | None:
        """The family of one hint alias: a family name, or text that is exactly one vocabulary term."""
        family = _canonical(alias, FAMILIES)
        if family is not None:
            return family
        hits = self._scan(alias)
        if len(hits) == 1 and alias[hits[0].start : hits[0].end] == alias:
            return hits[0].family
        return None


def _canonical(name: str, valid: Sequence[str]) -> str | None:
    folded = str(name).strip().casefold()
    return next((v for v in valid if v.casefold() == folded), None)


_HINT_HELP = (
    "valid: Scissors (scissors, Metzenbaum, 剪刀, …), "
    "Hook (Hook/Electrocautery, electrocautery, monopolar, cautery, L-hook, 电凝钩, …), "
    "Suction (Suction/Irrigation, irrigation, aspirator, 吸引器, …), "
    "Other (grasper, clipper, retractor, bipolar, 抓钳, …); join several families with '+' or ','"
)
_BUILTIN: Vocabulary | None = None


def parse_instrument_hint(hint: str, *, vocabulary: Vocabulary | None = None) -> list[str]:
    """Parse a user instrument hint into family names (FAMILIES order, deduplicated).

    Case-insensitive family names or any single vocabulary term ("electrocautery", "grasper",
    "电凝钩"). "/" joins aliases of ONE family ("Hook/Electrocautery" → ["Hook"]); "+" or ","
    joins several families ("Hook+Suction"). The whole hint "none" means no instrument → [].
    Anything else raises UserError with one line listing the valid names.
    """
    global _BUILTIN
    if vocabulary is None:
        if _BUILTIN is None:
            _BUILTIN = Vocabulary.from_builtin()
        vocabulary = _BUILTIN
    text = str(hint).strip()
    if text.casefold() == "none":
        return []
    if not text:
        raise UserError(f"empty instrument hint; {_HINT_HELP}")
    found: set[str] = set()
    for part in re.split(r"[+,，、]", text):
        aliases = [a.strip() for a in part.split("/")]
        if not all(aliases):
            raise UserError(f"malformed instrument hint {text!r} (empty name); {_HINT_HELP}")
        families = set()
        for alias in aliases:
            family = vocabulary._resolve_alias(alias)
            if family is None:
                where = f" in {text!r}" if alias != text else ""
                raise UserError(f"unknown instrument hint {alias!r}{where}; {_HINT_HELP}")
            families.add(family)
        if len(families) > 1:
            mixed = ", ".join(f for f in FAMILIES if f in families)
            raise UserError(
                f"instrument hint {part.strip()!r} mixes families ({mixed}); '/' joins aliases of one family, "
                "use '+' or ',' to name several"
            )
        found |= families
    return [f for f in FAMILIES if f in found]


def instrument_logits(families: Sequence[str], confidence: float = 5.0) -> torch.Tensor:
    """Gate-prior logits of shape [NUM_FAMILIES]: ``confidence`` at each named family, 0 elsewhere.

    All zeros (no family named) is the uninformative prior. Family names are case-insensitive.
    """
    import torch  # local: labelling captions should not pay for importing torch

    if not math.isfinite(confidence) or confidence < 0:
        raise UserError(f"instrument confidence must be a finite number >= 0, got {confidence}")
    logits = torch.zeros(NUM_FAMILIES, dtype=torch.float32)
    for name in families:
        family = _canonical(name, FAMILIES)
        if family is None:
            raise UserError(f"unknown instrument family {name!r}; valid: {', '.join(FAMILIES)}")
        logits[FAMILIES.index(family)] = float(confidence)
    return logits
