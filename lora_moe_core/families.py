"""The instrument families that name the experts: one table, in the one order used everywhere.

Every family-specific fact lives in its :class:`Family` entry: the expert's name, the hint spelling shown in help
and examples, the prompt of its sample clips, the caption keywords that label it (zh/en) and the synonyms the
synthetic captions use. Adding a fifth family is one entry here plus a bump of
``lora_moe_core.adapters.checkpoint.FORMAT_VERSION`` (checkpoints hold one expert per family;
tests/test_families.py pins the pair). Synthetic clips draw one instrument shape per family (data/synth_render.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One instrument family: expert ``FAMILIES.index(name)`` serves it."""

    name: str
    hint: str  # the seed's hint spelling, family/alias (any alias in ``terms`` parses too)
    sample_prompt: str  # prompt of the evaluation's and the pipelines' sample clips
    terms: tuple[str, ...]  # built-in caption keywords (zh/en) that name this family
    caption_nouns_zh: tuple[str, ...]  # synthetic captions: instrument names ...
    caption_acts_zh: tuple[str, ...]  # ... and what it does
    caption_nouns_en: tuple[str, ...]
    caption_acts_en: tuple[str, ...]


# fmt: off
FAMILY_TABLE: tuple[Family, ...] = (
    Family(
        name="Scissors",
        hint="Scissors",
        sample_prompt="腹腔镜下剪刀剪开组织",
        terms=(
            "剪刀", "手术剪", "腔镜剪", "腹腔镜剪", "腹腔镜剪刀", "弯剪", "直剪", "组织剪", "梅氏剪",
            "Metzenbaum剪", "钩剪", "线剪", "剪断", "剪开",
            "scissors", "curved scissors", "Metzenbaum", "Metzenbaum scissors", "hook scissors",
            "shears", "cut", "cutting",
        ),
        caption_nouns_zh=("剪刀", "手术剪", "腔镜剪", "弯剪", "组织剪", "梅氏剪"),
        caption_acts_zh=("剪开腹膜", "剪断胆囊管", "锐性分离粘连组织", "剪开胆囊浆膜"),
        caption_nouns_en=("scissors", "curved scissors", "Metzenbaum scissors", "laparoscopic scissors"),
        caption_acts_en=("cut the cystic duct", "divide the peritoneum", "trim adhesions"),
    ),
    Family(
        name="Hook",
        hint="Hook/Electrocautery",
        sample_prompt="电凝钩切割组织",
        terms=(
            "电凝钩", "电钩", "L型电钩", "单极电凝", "单极电钩", "单极", "电刀", "电铲", "电凝棒", "电灼", "电凝",
            "hook", "L-hook", "hook electrode", "monopolar", "electrocautery", "cautery", "diathermy",
            "Bovie", "spatula", "cauterize", "cauterizing", "cauterized", "cauterise", "cauterising",
            "coagulate", "coagulating", "coagulated", "coagulation", "electrocoagulation",
        ),
        caption_nouns_zh=("电凝钩", "电钩", "L型电钩", "单极电钩"),
        caption_acts_zh=("在胆囊三角区分离组织", "电凝止血", "切开胆囊浆膜", "游离胆囊床"),
        caption_nouns_en=("a hook", "an L-hook", "an electrocautery hook", "a monopolar hook"),
        caption_acts_en=("dissect Calot's triangle", "coagulate a small bleeder", "open the serosa"),
    ),
    Family(
        name="Suction",
        hint="Suction",
        sample_prompt="吸引器吸除积血",
        terms=(
            "吸引器", "吸引管", "吸引头", "冲洗吸引器", "吸引冲洗器", "冲吸器", "冲洗器", "冲洗管", "负压吸引",
            "吸引", "冲洗", "吸除",
            "suction", "suctioning", "suctioned", "suction-irrigation", "suction irrigator",
            "aspirator", "irrigator", "aspirate", "aspirating", "aspirated", "aspiration",
            "irrigate", "irrigating", "irrigated", "irrigation",
        ),
        caption_nouns_zh=("吸引器", "吸引管", "冲洗吸引器", "吸引头"),
        caption_acts_zh=("吸除积血", "冲洗术野", "吸净渗出液", "吸除肝下积液"),
        caption_nouns_en=("a suction irrigator", "an aspirator", "a suction tube", "an irrigator"),
        caption_acts_en=("aspirate pooled blood", "irrigate the operative field", "clear the fluid"),
    ),
    Family(
        name="Other",
        hint="Other/Grasper",
        sample_prompt="抓钳提起胆囊",
        terms=(
            "抓钳", "无损伤抓钳", "分离钳", "解剖钳", "弯钳", "直角钳", "鸭嘴钳", "扁钳", "持针器", "持针钳",
            "施夹钳", "施夹器", "钛夹", "生物夹", "可吸收夹", "结扎夹", "Hem-o-lok夹", "取物袋", "标本袋", "标本取物器",
            "穿刺器",
            "套管", "拉钩", "肝拉钩", "肝脏拉钩", "牵开器", "双极", "双极电凝", "双极电凝钳", "双极钳", "超声刀",
            "结扎速", "血管闭合器", "切割闭合器", "吻合器", "缝针", "缝线", "纱布", "纱条", "引流管",
            "grasper", "atraumatic grasper", "grasping forceps", "forceps", "grasp", "grasping", "grasped",
            "Maryland", "Maryland dissector", "dissector", "right-angle", "needle holder", "needle driver",
            "clip applier", "clipper", "clip", "titanium clip", "polymer clip", "Hem-o-lok", "specimen bag",
            "retrieval bag", "endobag", "endo bag",
            "trocar", "cannula", "retractor", "liver retractor", "retract", "retracting", "retracted",
            "retraction", "bipolar", "bipolar forceps", "bipolar grasper", "bipolar cautery",
            "bipolar coagulation", "bipolar electrocautery", "harmonic", "harmonic scalpel", "harmonic shears",
            "ultrasonic shears", "ultrasonic scalpel", "ultrasonic dissector", "LigaSure", "vessel sealer",
            "stapler", "linear cutter", "cutting stapler", "suture", "needle", "gauze", "drain",
        ),
        caption_nouns_zh=("抓钳", "无损伤抓钳", "分离钳", "弯钳"),
        caption_acts_zh=("夹持胆囊底部", "牵拉胆囊颈部", "提起胆囊壶腹部", "向外侧牵拉胆囊"),
        caption_nouns_en=("a grasper", "an atraumatic grasper", "a Maryland dissector", "grasping forceps"),
        caption_acts_en=("retract the gallbladder", "hold the fundus", "lift the gallbladder neck"),
    ),
)
# fmt: on

#: Words that consume caption text but name no visible instrument ("laparoscopic" is not the scissors' word).
IGNORED_TERMS: tuple[str, ...] = (
    "腹腔镜下",
    "腹腔镜",
    "腔镜下",
    "镜头",
    "laparoscopic",
    "laparoscope",
    "laparoscopy",
    "endoscope",
    "endoscopic",
    "camera",
)

#: Expert index e serves FAMILIES[e]. Checkpoints, gates, labels and reports all use this order.
FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILY_TABLE)
NUM_FAMILIES = len(FAMILIES)


def family(name: str) -> Family:
    """The table entry of ``name`` (a canonical family name)."""
    return FAMILY_TABLE[FAMILIES.index(name)]
