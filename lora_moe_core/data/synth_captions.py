"""Random zh/en captions for the synthetic clips: synonym tables, templates and ``make_caption``.

Every caption names each instrument family of its clip with a synonym the built-in vocabulary
recognises; ``lora_moe_core.data.synth.generate_dataset`` checks that when it writes a dataset.
"""

from __future__ import annotations

import numpy as np

_ZH_NOUNS = {
    "Scissors": ("剪刀", "手术剪", "腔镜剪", "弯剪", "组织剪", "梅氏剪"),
    "Hook": ("电凝钩", "电钩", "L型电钩", "单极电钩"),
    "Suction": ("吸引器", "吸引管", "冲洗吸引器", "吸引头"),
    "Other": ("抓钳", "无损伤抓钳", "分离钳", "弯钳"),
}
_ZH_ACTS = {
    "Scissors": ("剪开腹膜", "剪断胆囊管", "锐性分离粘连组织", "剪开胆囊浆膜"),
    "Hook": ("在胆囊三角区分离组织", "电凝止血", "切开胆囊浆膜", "游离胆囊床"),
    "Suction": ("吸除积血", "冲洗术野", "吸净渗出液", "吸除肝下积液"),
    "Other": ("夹持胆囊底部", "牵拉胆囊颈部", "提起胆囊壶腹部", "向外侧牵拉胆囊"),
}
_ZH_PREFIXES = ("腹腔镜下", "腔镜下", "", "镜头下可见", "腹腔镜胆囊切除术中，", "术野中")
_ZH_ONE = ("{p}{A}{a}", "{p}使用{A}{a}", "{p}术者以{A}{a}", "{p}{A}正在{a}，视野清晰")
_ZH_TWO = ("{p}{A}{a}，{B}{b}", "{p}{A}{a}的同时，{B}{b}", "{p}{A}与{B}配合操作：{a}，并{b}")
_EN_NOUNS = {
    "Scissors": ("scissors", "curved scissors", "Metzenbaum scissors", "laparoscopic scissors"),
    "Hook": ("a hook", "an L-hook", "an electrocautery hook", "a monopolar hook"),
    "Suction": ("a suction irrigator", "an aspirator", "a suction tube", "an irrigator"),
    "Other": ("a grasper", "an atraumatic grasper", "a Maryland dissector", "grasping forceps"),
}
_EN_ACTS = {
    "Scissors": ("cut the cystic duct", "divide the peritoneum", "trim adhesions"),
    "Hook": ("dissect Calot's triangle", "coagulate a small bleeder", "open the serosa"),
    "Suction": ("aspirate pooled blood", "irrigate the operative field", "clear the fluid"),
    "Other": ("retract the gallbladder", "hold the fundus", "lift the gallbladder neck"),
}
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
