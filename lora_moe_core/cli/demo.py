"""The tiny end-to-end run on CPU that ``make run`` does until the Kubeflow pipeline lands.

It types the commands a user would: ``synth-data`` → ``label`` → ``cache`` → ``train-classifier`` →
``train`` Stage 1 → ``train`` Stage 2 → ``export``, on the tiny random Wan2.2 pair with the demo configs, then
shows the routing of the seed's hint and prompt and checks the exported LoRA with diffusers' own loader.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

from lora_moe_core.errors import UserError

DEMO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def _run(step: str, argv: list[str]) -> None:
    from lora_moe_core.cli.main import main

    print(f"\n[{step}] lora-moe {shlex.join(argv)}", flush=True)
    if main(argv) != 0:
        raise UserError(f"demo step '{step}' failed (see the error above)")


def _diffusers_parity(checkpoint: Path, exported: Path, families: list[str]) -> float:
    """Relative difference between our LoRA-MoE and diffusers running the exported high-noise LoRA."""
    from diffusers import WanPipeline

    from lora_moe_core.adapters.checkpoint import load_network
    from lora_moe_core.data.vocabulary import instrument_logits
    from lora_moe_core.model.wan import build_transformer, linear_shapes

    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([950.0]),
              "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator), "return_dict": False}  # fmt: skip
    ours = build_transformer("tiny", seed=0)
    network = load_network(checkpoint, linear_shapes(ours))
    network.route.alpha_base = 0.7
    network.apply_to(ours)
    network.set_routing(instrument_logits(families))
    expected = ours(**inputs)[0]
    theirs = build_transformer("tiny", seed=0)
    theirs.load_lora_adapter(WanPipeline.lora_state_dict(str(exported)), prefix="transformer", adapter_name="demo")
    return ((theirs(**inputs)[0] - expected).norm() / expected.norm()).item()


def run_demo(output_dir: str | Path, seed: int = 0, num_videos: int = 32) -> None:
    """Run the whole tiny pipeline into ``output_dir`` and print where everything went."""
    out = Path(output_dir)
    # one MLflow store for both stages, so the runs compare side by side in `mlflow ui`
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out.resolve() / 'mlruns.db'}")
    out.mkdir(parents=True, exist_ok=True)
    data, cache = out / "data", out / "cache"
    stage1, stage2 = out / "vanilla_lora", out / "lora_moe_stage_b"
    _run("1 synthetic clips", ["synth-data", "--output", str(data), "--num_videos", str(num_videos),
                               "--seed", str(seed)])  # fmt: skip
    _run("2 caption labels", ["label", "--dataset", str(data), "--output", str(data / "labels.jsonl")])
    _run("3 latent cache", ["cache", "--dataset", str(data), "--labels", str(data / "labels.jsonl"),
                            "--task", "tiny", "--output", str(cache)])  # fmt: skip
    _run("4 instrument classifier", ["train-classifier", "--cache", str(cache),
                                     "--output", str(out / "classifier.safetensors")])  # fmt: skip
    _run("5 Stage 1", ["train", "--config", str(DEMO_CONFIGS / "vanilla_lora.toml"), "--cache", str(cache),
                       "--output_dir", str(stage1), "--seed", str(seed)])  # fmt: skip
    _run("6 Stage 2", ["train", "--config", str(DEMO_CONFIGS / "lora_moe_stage_b_merged.toml"), "--cache", str(cache),
                       "--base_lora_weights", str(stage1 / "lora_final.safetensors"),
                       "--output_dir", str(stage2), "--seed", str(seed)])  # fmt: skip
    checkpoint = stage2 / "lora_moe_final.safetensors"
    export = ["export", "--lora_moe_weights", str(checkpoint), "--instrument_hint", "Hook/Electrocautery",
              "--alpha_base", "0.7", "--alpha_expert", "1.0", "--to", "comfy", "--dtype", "fp32",
              "--output_dir", str(out / "export")]  # fmt: skip
    _run("7 per-instrument export", export)
    _run("8 held-out clips", ["synth-data", "--output", str(out / "heldout"), "--num_videos", "8",
                              "--seed", str(seed + 1)])  # fmt: skip
    _run("9 held-out cache", ["cache", "--dataset", str(out / "heldout"), "--task", "tiny",
                              "--output", str(out / "heldout_cache")])  # fmt: skip
    _run("10 evaluation", ["evaluate", "--task", "tiny", "--lora_moe_weights", str(checkpoint),
                           "--base_lora_weights", str(stage1 / "lora_final.safetensors"),
                           "--cache", str(out / "heldout_cache"), "--output_dir", str(out / "evaluation"),
                           "--classifier_weights", str(out / "classifier.safetensors"),
                           "--samples_per_family", "1", "--sample_steps", "4"])  # fmt: skip
    _run("11 inference", ["infer", "--task", "tiny", "--lora_moe_weights", str(checkpoint),
                          "--prompt", "电凝钩切割组织",
                          "--instrument_hint", "Hook/Electrocautery", "--alpha_base", "0.7", "--alpha_expert", "1.0",
                          "--num_frames", "17", "--height", "64", "--width", "64", "--num_inference_steps", "8",
                          "--output_path", str(out / "output.mp4")])  # fmt: skip
    exported = sorted((out / "export").glob("Hook*.safetensors"))[0]
    error = _diffusers_parity(checkpoint, exported, ["Hook"])
    print(f"\n[12] diffusers' own loader on {exported.name} reproduces the LoRA-MoE at t=950: rel. error {error:.1e}")
    print(f"\ndone. Stage-2 checkpoint: {checkpoint}")
    print(f"      exported LoRAs:     {out / 'export'}")
    print(f"      evaluation report:  {out / 'evaluation' / 'report.html'}")
    print(f"      generated video:    {out / 'output.mp4'}")
    print(f"      MLflow runs:        mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}")
