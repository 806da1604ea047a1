"""Pipeline parameter defaults that come from the library: the seed's hyper-parameters (read from the seed configs
shipped in the package, so the two never drift apart), the sample prompts of the family table, the shared names."""

from __future__ import annotations

import tomllib

from lora_moe_core.config import resolve_config_path
from lora_moe_core.families import FAMILY_TABLE, family

#: where the platform team puts the diffusers-layout Wan2.2-T2V-A14B (manifests/ create the bucket)
BASE_MODEL_URI = "s3://lora-moe-data/models/Wan2.2-T2V-A14B-Diffusers"
STAGE1_CONFIG = "configs/vanilla_lora.toml"
STAGE2_CONFIG = "configs/lora_moe_stage_b_merged.toml"
DEMO_STAGE1_CONFIG = "configs/demo/vanilla_lora.toml"
DEMO_STAGE2_CONFIG = "configs/demo/lora_moe_stage_b_merged.toml"


def training_section(config: str) -> dict:
    """The ``[training]`` table of a shipped config."""
    with resolve_config_path(config).open("rb") as handle:
        return tomllib.load(handle)["training"]


SEED_STAGE1 = training_section(STAGE1_CONFIG)
SEED_STAGE2 = training_section(STAGE2_CONFIG)

# one prompt per expert, with the seed's hint spelling (family/alias); the videos and the report show the routing
PROMPTS = [{"prompt": entry.sample_prompt, "instrument_hint": entry.hint} for entry in FAMILY_TABLE]
# the local demo run generates one clip: the seed's own example
DEMO_PROMPTS = [{"prompt": family("Hook").sample_prompt, "instrument_hint": family("Hook").hint}]
