"""Pipeline parameter defaults that come from elsewhere: the seed's hyper-parameters (read from the seed configs,
so the two never drift apart) and the prompts of the sample videos."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE1_CONFIG = "configs/vanilla_lora.toml"
STAGE2_CONFIG = "configs/lora_moe_stage_b_merged.toml"
DEMO_STAGE1_CONFIG = "configs/demo/vanilla_lora.toml"
DEMO_STAGE2_CONFIG = "configs/demo/lora_moe_stage_b_merged.toml"


def training_section(config: str) -> dict:
    """The ``[training]`` table of a config under the repository root."""
    with (REPO / config).open("rb") as handle:
        return tomllib.load(handle)["training"]


SEED_STAGE1 = training_section(STAGE1_CONFIG)
SEED_STAGE2 = training_section(STAGE2_CONFIG)

# one prompt per expert, with the seed's hint spelling (family/alias); the videos and the report show the routing
PROMPTS = [
    {"prompt": "腹腔镜下剪刀剪开组织", "instrument_hint": "Scissors"},
    {"prompt": "电凝钩切割组织", "instrument_hint": "Hook/Electrocautery"},
    {"prompt": "吸引器吸除积血", "instrument_hint": "Suction"},
    {"prompt": "抓钳提起胆囊", "instrument_hint": "Other/Grasper"},
]
