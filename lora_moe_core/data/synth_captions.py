"""Random zh/en captions for the synthetic clips: synonym tables, templates and ``make_caption``.

Every caption names each instrument family of its clip with a synonym the built-in vocabulary
recognises; ``lora_moe_core.data.synth.generate_dataset`` checks that when it writes a dataset.
"""

from __future__ import annotations

import numpy as np

from lora_moe_core.families import FAMILY_TABLE

_ZH_NOUNS = {entry.name: entry.caption_nouns_zh for entry in FAMILY_TABLE}
_ZH_ACTS = {entry.name: entry.caption_acts_zh for entry in FAMILY_TABLE}
_ZH_PREFIXES = ("腹腔镜下", "腔镜下", "", "镜头下可见", "腹腔镜胆囊切除术中，", "术野中")
_ZH_ONE = ("{p}{A}{a}", "{p}使用{A}{a}", "{p}术者以{A}{a}", "{p}{A}正在{a}，视野清晰")
_ZH_TWO = ("{p}{A}{a}，{B}{b}", "{p}{A}{a}的同时，{B}{b}", "{p}{A}与{B}配合操作：{a}，并{b}")
_EN_NOUNS = {entry.name: entry.caption_nouns_en for entry in FAMILY_TABLE}
_EN_ACTS = {entry.name: entry.caption_acts_en for entry in FAMILY_TABLE}
_EN_DOUBLED = {"cut": "cutting", "trim": "trimming"}  # the only verbs above that double a consonant
_EN_PREFIXES = ("Laparoscopic view: ", "Endoscopic footage: ", "", "Laparoscopic cholecystectomy, ",
                "Camera close-up: ")  # fmt: skip
_EN_ONE = ("{p}the surgeon uses {A} to {a}.", "{p}{ag} with {A}.", "{p}close-up of {A} being used to {a}.")
_EN_TWO = ("{p}the surgeon uses {A} to {a} and {B} to {b}.", "{p}{ag} with {A} while {bg} with {B}.",
           "{p}{A} and {B} in view: {ag} and {bg}.")  # fmt: skip


def _gerund(phrase: str) -> str:
    verb, _, rest = phrase.partition(" ")
    ing = _EN_DOUBLED.get(verb) or (verb[:-1] if verb.endswith("e") else verb) + "ing"
    return f"{ing} {rest}"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def make_caption(families: list[str], rng: np.random.Generator, *, english: bool) -> str:
    """A zh or en caption naming each family in ``families`` (one or two) with a random synonym."""
    order = [families[i] for i in rng.permutation(len(families))]
    fields: dict[str, str] = {}
    for slot, family in zip("AB", order, strict=False):
        low = slot.lower()
        if english:
            fields[slot] = _pick(rng, _EN_NOUNS[family])
            fields[low] = _pick(rng, _EN_ACTS[family])
            fields[low + "g"] = _gerund(fields[low])
        else:
            fields[slot], fields[low] = _pick(rng, _ZH_NOUNS[family]), _pick(rng, _ZH_ACTS[family])
    one, two, prefixes = (_EN_ONE, _EN_TWO, _EN_PREFIXES) if english else (_ZH_ONE, _ZH_TWO, _ZH_PREFIXES)
    text = _pick(rng, two if len(order) == 2 else one).format(p=_pick(rng, prefixes), **fields)
    return text[0].upper() + text[1:]
