"""Typed, validated configuration loaded from TOML, with command-line overrides.

The TOML layout follows the seed (``[training]``, ``[lora]``, ``[lora_moe]``, ``[router]``, ``[loss]``) plus
``[model]`` and ``[gates]``. Every field name is unique across sections, so each one is also a command-line
flag of the same name (``--learning_rate 5e-5``); a flag given on the command line wins over the file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_moe_core.defaults import EXPERIMENT, TASK_NAMES
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES, NUM_FAMILIES
from lora_moe_core.guards.files import read_regular_bytes
from lora_moe_core.guards.parse import load_json, load_toml
from lora_moe_core.guards.text import decode_utf8

# Block numbers of at most 4 digits: int() of a 5,000-digit "last_..." raises ValueError (Python's digit limit)
BLOCK_SELECTOR = re.compile(r"^(all|last_\d{1,4}|first_\d{1,4}|\d{1,4}-\d{1,4})$")
# Sizes that allocate tensors are bounded here, before any model or optimizer is built: `lora_dim = 1e8` would
# otherwise try to allocate hundreds of GB and die in the allocator. The limits are far above what a real
# WAN2.2 A14B run uses (ranks 4-128 on 5120-wide layers; the seed's router is 64 wide; 40 blocks).
MAX_RANK = 1024
MAX_ROUTER_HIDDEN = 4096
MAX_BLOCK_INDEX = 9999
MAX_TIMESTEP_BUCKETS = 100


class _Section(BaseModel):
    # allow_inf_nan=False: learning_rate = inf (or nan from a flag) would train to a checkpoint of NaNs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _at_most(limit: int, why: str):
    """A field validator refusing values above ``limit``; the message says the limit and why it is enough."""

    def check(value: int | None) -> int | None:
        if value is not None and value > limit:
            raise ValueError(f"at most {limit:,} ({why})")
        return value

    return check


_RANK_LIMIT = _at_most(MAX_RANK, "WAN2.2 A14B adapters use ranks 4-128 on its 5120-wide layers")


class ModelConfig(_Section):
    """Which WAN2.2 model the adapters sit on."""

    task: Literal[TASK_NAMES] = Field(
        "t2v-A14B", description="model family: t2v-A14B (two 14B DiTs) or tiny (random, CPU tests and demo)"
    )
    model: str | None = Field(
        None, description="diffusers-layout model folder, local path or s3:// URI (or the single files below)"
    )
    dit: str | None = Field(None, description="low-noise DiT single file, original Wan/ComfyUI keys (musubi --dit)")
    dit_high_noise: str | None = Field(None, description="high-noise DiT single file (musubi --dit_high_noise)")
    vae: str | None = Field(None, description="Wan2.1 VAE single file, e.g. wan_2.1_vae.safetensors (musubi --vae)")
    t5: str | None = Field(None, description="UMT5 encoder .pth/.safetensors, tensors only (musubi --t5)")
    timestep_boundary: float | None = Field(
        None, gt=0, lt=1, description="high/low-noise DiT switch as a fraction of 1000 (default: the task's, 0.875)"
    )


class LoRAConfig(_Section):
    """Target modules and ranks (Stage 1; the experts of Stage 2 use the same targets and ranks)."""

    lora_dim: int = Field(4, ge=1, description="default LoRA rank for every targeted module")
    lora_alpha: float = Field(1.0, gt=0, description="LoRA alpha; the branch scale is alpha/rank (musubi convention)")
    target_blocks: str | list[int] = Field(
        "last_8", description="DiT blocks holding attention adapters: last_N, first_N, A-B, all or a list of indices"
    )
    rank_q: int | None = Field(8, ge=0, description="rank of attn1.to_q (0 = not adapted; unset = lora_dim)")
    rank_k: int | None = Field(None, ge=0, description="rank of attn1.to_k (0 = not adapted; unset = lora_dim)")
    rank_v: int | None = Field(None, ge=0, description="rank of attn1.to_v (0 = not adapted; unset = lora_dim)")
    rank_o: int | None = Field(None, ge=0, description="rank of attn1.to_out.0 (0 = not adapted; unset = lora_dim)")
    rank_ffn: int | None = Field(None, ge=0, description="rank of ffn.net.0.proj (0 = not adapted; unset = lora_dim)")
    ffn_target_blocks: str | list[int] = Field("last_3", description="DiT blocks holding the FFN adapter")

    @field_validator("target_blocks", "ffn_target_blocks")
    @classmethod
    def _check_blocks(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str) and not BLOCK_SELECTOR.match(value):
            raise ValueError(f"'{value}' is not one of all, last_N, first_N, A-B or a list of block indices")
        if isinstance(value, list) and any(not 0 <= index <= MAX_BLOCK_INDEX for index in value):
            raise ValueError(f"block indices must be from 0 to {MAX_BLOCK_INDEX} (WAN2.2 A14B has 40 blocks)")
        return value

    _check_ranks = field_validator("lora_dim", "rank_q", "rank_k", "rank_v", "rank_o", "rank_ffn")(_RANK_LIMIT)

    @model_validator(mode="after")
    def _check_some_rank(self) -> LoRAConfig:
        ranks = (self.rank_q, self.rank_k, self.rank_v, self.rank_o, self.rank_ffn)
        if all(rank == 0 for rank in ranks):
            raise ValueError("every rank_* is 0: no module would be adapted (the checkpoint would hold no expert)")
        return self


class LoRAMoEConfig(_Section):
    """The expert bank of Stage 2."""

    num_experts: int = Field(NUM_FAMILIES, description=f"experts, one per family: {', '.join(FAMILIES)}")
    lora_dim: int | None = Field(
        None, ge=1, description="default expert rank (unset = lora.lora_dim)", json_schema_extra={"flag": "expert_dim"}
    )
    expert_alpha: float | None = Field(None, gt=0, description="expert LoRA alpha (unset = lora.lora_alpha)")
    use_base_lora: bool = Field(True, description="keep the Stage-1 LoRA as a frozen base branch")
    base_lora_weights: str | None = Field(None, description="Stage-1 LoRA file (musubi, ComfyUI or diffusers keys)")
    lora_moe_weights: str | None = Field(None, description="Stage-2 checkpoint to start from (stage_c: router only)")
    alpha_base: float = Field(1.0, ge=0, description="multiplier of the frozen base LoRA branch (seed inference 0.7)")
    alpha_expert: float = Field(1.0, ge=0, description="multiplier of the gated expert branches")

    _check_rank = field_validator("lora_dim")(_RANK_LIMIT)

    @field_validator("num_experts")
    @classmethod
    def _check_experts(cls, value: int) -> int:
        if value != NUM_FAMILIES:
            raise ValueError(f"must be {NUM_FAMILIES}: one expert per family ({', '.join(FAMILIES)})")
        return value


class RouterConfig(_Section):
    """How per-sample gates are computed from instrument logits."""

    routing_mode: Literal["learned", "rule_based", "uniform"] = Field(
        "learned", description="learned MLP router, rule_based (softmax of instrument logits) or uniform gates"
    )
    train_router: bool = Field(True, description="train the router together with the experts")
    use_teacher_guidance: bool = Field(True, description="add KL(learned || rule-based teacher) to the loss")
    teacher_kl_weight: float = Field(1.0, ge=0, description="weight of the teacher KL loss")
    router_hidden_dim: int = Field(64, ge=1, description="hidden width of the router MLP")
    router_temperature: float = Field(1.0, gt=0, description="softmax temperature of the router gates")
    top_k: int = Field(2, ge=1, le=NUM_FAMILIES, description="experts kept per sample; gates renormalised to sum 1")
    teacher_temperature: float = Field(1.0, gt=0, description="softmax temperature of the rule-based teacher")
    teacher_label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the teacher distribution")
    hint_confidence: float = Field(5.0, gt=0, description="instrument logit given to a family named by a hint/caption")

    _check_hidden = field_validator("router_hidden_dim")(
        _at_most(MAX_ROUTER_HIDDEN, "the router maps 4 family logits to 4 experts; the seed's is 64 wide")
    )

    @property
    def trains_router(self) -> bool:
        """Whether the router MLP learns: rule_based and uniform routing have none to train (seed FAQ)."""
        return self.routing_mode == "learned" and self.train_router


class GateConfig(_Section):
    """Timestep-selective gates and gate statistics."""

    timestep_boundaries: list[float] = Field(
        [875.0], description="timestep bucket edges in (0, 1000); default splits Wan2.2's high/low-noise regimes"
    )
    train_timestep_gates: bool = Field(True, description="learn a gate per expert and timestep bucket")
    gate_ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay of expert-usage statistics")

    @field_validator("timestep_boundaries")
    @classmethod
    def _check_boundaries(cls, value: list[float]) -> list[float]:
        if any(not 0 < edge < 1000 for edge in value) or value != sorted(set(value)):
            raise ValueError("must be strictly increasing values in (0, 1000)")
        if len(value) >= MAX_TIMESTEP_BUCKETS:
            raise ValueError(f"at most {MAX_TIMESTEP_BUCKETS - 1} edges (one gate per expert and bucket)")
        return value


class LossConfig(_Section):
    """Loss weights of Stage 2 (seed values)."""

    weight_roi_recon: float = Field(3.0, ge=0, description="weight of the ROI-weighted reconstruction loss")
    use_identity_loss: bool = Field(False, description="add the instrument-identity loss (needs the classifier)")
    weight_identity: float = Field(0.5, ge=0, description="weight of the identity loss")
    use_temporal_loss: bool = Field(False, description="add the temporal-consistency loss")
    weight_temporal: float = Field(0.5, ge=0, description="weight of the temporal loss")
    weight_routing_entropy: float = Field(0.02, ge=0, description="weight of the per-sample routing entropy loss")
    weight_routing_load_balance: float = Field(0.1, ge=0, description="weight of the load-balance loss")
    classifier_weights: str | None = Field(
        None, description="instrument classifier: identity loss, teacher logits for captions naming nothing"
    )
    balance_target: Literal["uniform", "dataset"] = Field(
        "uniform", description="balance usage towards uniform or towards the dataset's family frequencies"
    )


class TrainingConfig(_Section):
    """Optimisation and run settings."""

    training_stage: Literal["stage_a", "stage_b", "stage_c"] = Field(
        "stage_b", description="stage_a vanilla LoRA, stage_b experts+router, stage_c router only"
    )
    num_train_epochs: int = Field(20, ge=1, description="passes over the dataset")
    max_train_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate")
    batch_size: int = Field(1, ge=1, description="clips per micro-batch")
    gradient_accumulation_steps: int = Field(8, ge=1, description="micro-batches per optimizer step")
    seed: int = Field(42, ge=0, le=2**63 - 1, description="random seed")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="autocast precision")
    gradient_checkpointing: bool = Field(True, description="recompute adapted blocks in backward")
    offload_inactive_dit: bool = Field(
        False, description="keep the other noise regime's DiT in host memory (A14B on 40 GB cards)"
    )
    fp8_base: bool = Field(False, description="store the frozen DiT block linears in fp8 e4m3, scaled per channel")
    blocks_to_swap: int = Field(
        0, ge=0, description="stream the first N DiT blocks' frozen weights from host memory (24 GB: 20 with fp8)"
    )
    fp8_fast: bool = Field(
        False, description="with fp8_base: blocks before the first adapter run fp8 tensor-core matmuls (Hopper/Ada)"
    )
    compile_blocks: bool = Field(
        False, description="torch.compile the DiT blocks, one graph per kind of block (GPU; with any memory mode)"
    )
    attention_backend: Literal["sdpa", "cudnn", "flash", "efficient"] = Field(
        "sdpa", description="attention kernel of every block: sdpa = PyTorch's choice (cuDNN's on an H200), or forced"
    )
    frozen_attention: Literal["off", "fa3", "fa3_fp8"] = Field(
        "off", description="self-attention of the blocks before the first adapter: FlashAttention-3 (pip fa3-fwd)"
    )
    timestep_sampling: Literal["uniform", "sigma", "logit_normal", "shift"] = Field(
        "shift", description="flow-matching timestep sampler"
    )
    discrete_flow_shift: float = Field(12.0, gt=0, description="shift of the timestep sampler (12 = A14B inference)")
    save_every_n_steps: int | None = Field(None, ge=1, description="write a checkpoint every N optimizer steps")
    output_dir: str = Field("outputs/lora_moe_stage_b", description="run folder for checkpoints and state")
    cache: str | None = Field(None, description="latent cache folder or s3:// prefix (from `lora-moe cache`)")
    resume: str | None = Field(None, description="auto (latest save in output_dir) or a training_state_step_N.json")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    lr_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    experiment: str = Field(EXPERIMENT, description="MLflow experiment name")
    baseline_arm: bool = Field(
        False,
        description="with a stage_b config: train the matched single-LoRA arm instead of the experts (one LoRA of "
        "their total rank over the frozen Stage-1 LoRA, same clips, steps and non-routing losses) into "
        "<output_dir>_matched_lora; compare with `lora-moe evaluate --matched_lora_weights`",
    )

    @model_validator(mode="after")
    def _check_memory_modes(self) -> TrainingConfig:
        if self.fp8_fast and not self.fp8_base:
            raise ValueError("fp8_fast needs fp8_base (the fast matmuls read the fp8 weights)")
        return self

    @model_validator(mode="after")
    def _check_baseline_arm(self) -> TrainingConfig:
        if self.baseline_arm and self.training_stage == "stage_c":
            raise ValueError("the baseline arm is matched to a stage_b run (experts + router), not to stage_c")
        return self


class Config(_Section):
    """The whole run configuration."""

    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    lora_moe: LoRAMoEConfig = LoRAMoEConfig()
    router: RouterConfig = RouterConfig()
    gates: GateConfig = GateConfig()
    loss: LossConfig = LossConfig()
    training: TrainingConfig = TrainingConfig()


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation
    for name, field in Config.model_fields.items()  # type: ignore[misc]
}


def flag_table() -> dict[str, tuple[str, str]]:
    """Map every command-line flag name to its ``(section, field)``."""
    table: dict[str, tuple[str, str]] = {}
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            flag = str(extra.get("flag", name))
            if flag in table:
                raise RuntimeError(f"config flag --{flag} is defined twice")
            table[flag] = (section, name)
    return table


def _suggestion(loc: tuple) -> str:
    """'; did you mean ...?' for a misspelt section or key, or the section a misplaced key belongs to."""
    name = str(loc[-1])
    if len(loc) == 2:
        home = next((section for section, model in SECTIONS.items() if name in model.model_fields), None)
        if home is not None:
            return f"; it belongs in [{home}]"
    candidates = list(SECTIONS) if len(loc) == 1 else list(getattr(SECTIONS.get(str(loc[0])), "model_fields", []))
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{key}'{_suggestion(first['loc'])}{more}"
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' ValueErrors
    return f"{source}: bad value for '{key}': {message} (got {first.get('input')!r}){more}"


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (or the JSON a multi-GPU launch writes), turning every failure into a one-line error."""
    path = Path(path)
    text = decode_utf8(read_regular_bytes(path, "config file"), f"config {path}")
    data = load_json(text, str(path)) if path.suffix == ".json" else load_toml(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a table of sections, got {type(data).__name__}")
    return data


def resolve_config_path(config: str | Path) -> Path:
    """A config path as given when it exists, else one of the configs shipped inside the package
    (``configs/vanilla_lora.toml``, ``configs/demo/...``): a pipeline parameter names them the same way in a
    checkout, an installed wheel and the images."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parent / path


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a config from TOML (or defaults) and apply flag overrides.

    Args:
        path: TOML file, or None for the built-in defaults.
        overrides: ``{flag_name: value}`` as given on the command line; they win over the file.

    Returns:
        The validated :class:`Config`.

    Raises:
        UserError: on a missing file, bad TOML, an unknown key or a bad value (one line naming the key).
    """
    data = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    table = flag_table()
    for flag, value in (overrides or {}).items():
        if flag not in table:
            raise UserError(f"unknown config flag --{flag}")
        section, name = table[flag]
        if not isinstance(data.setdefault(section, {}), dict):
            raise UserError(f"{source}: '{section}' must be a table")
        data[section][name] = value
        source = f"{source} + flags" if "+ flags" not in source else source
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(exc, source)) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON-ready dict of the config (for checkpoint metadata and MLflow params)."""
    return config.model_dump(mode="json")
