"""KFP components: thin ``@dsl.component`` shims that import ``lora_moe_core`` inside and call one command.

Importing this package needs only ``kfp`` and ``kfp-kubernetes`` (no torch), so compiling is fast anywhere.
Big data travels as ``s3://`` (or local path) string parameters; adapters, reports and metrics as KFP artifacts.
"""

from components.cache_latents import cache_latents
from components.evaluate import evaluate
from components.import_model import import_lora_moe
from components.infer_export import infer_export
from components.label_captions import label_captions
from components.prepare_data import plan_shards, prepare_data
from components.register_model import register_model
from components.tracking import finish_tracking, start_tracking
from components.train_baseline_arm import skip_baseline_arm, train_baseline_arm
from components.train_stage1 import import_stage1, train_stage1
from components.train_stage2 import train_stage2
from components.train_stage2_trainjob import train_stage2_trainjob

__all__ = [
    "cache_latents",
    "evaluate",
    "finish_tracking",
    "import_lora_moe",
    "import_stage1",
    "infer_export",
    "label_captions",
    "plan_shards",
    "prepare_data",
    "register_model",
    "skip_baseline_arm",
    "start_tracking",
    "train_baseline_arm",
    "train_stage1",
    "train_stage2",
    "train_stage2_trainjob",
]
