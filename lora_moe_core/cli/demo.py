"""The tiny end-to-end run on CPU (``lora-moe demo``; ``make run`` runs the same steps as a Kubeflow pipeline).

It calls, in order, the library functions behind ``synth-data`` → ``label`` → ``cache`` → ``train-classifier`` →
``train`` Stage 1 → ``train`` Stage 2 → ``export`` → ``evaluate`` → ``infer``, on the tiny random Wan2.2 pair with
the demo configs, then checks the exported LoRA with diffusers' own loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_moe_core.config import resolve_config_path
from lora_moe_core.defaults import ALPHA_BASE, EXPERIMENT
from lora_moe_core.families import family
from lora_moe_core.guards.files import check_output_folder

DEMO_CONFIGS = resolve_config_path("configs/demo")  # shipped in the package


def _step(title: str) -> None:
    print(f"\n[{title}]", flush=True)


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
    network.route.alpha_base = ALPHA_BASE  # as infer and export use it
    network.apply_to(ours)
    network.set_routing(instrument_logits(families))
    expected = ours(**inputs)[0]
    theirs = build_transformer("tiny", seed=0)
    theirs.load_lora_adapter(WanPipeline.lora_state_dict(str(exported)), prefix="transformer", adapter_name="demo")
    return ((theirs(**inputs)[0] - expected).norm() / expected.norm()).item()


def run_demo(output_dir: str | Path, seed: int = 0, num_videos: int = 32) -> None:
    """Run the whole tiny pipeline into ``output_dir`` and print where everything went."""
    from lora_moe_core.adapters.checkpoint import load_network
    from lora_moe_core.adapters.export import export_instrument_lora
    from lora_moe_core.cache.build import cache_dataset
    from lora_moe_core.cache.writer import CacheSettings
    from lora_moe_core.config import load_config
    from lora_moe_core.data.labeling import label_dataset
    from lora_moe_core.data.latent_cache import read_cache
    from lora_moe_core.data.synth import generate_dataset
    from lora_moe_core.evaluation.run import EvaluationSettings, run_evaluation
    from lora_moe_core.inference.generate import run_infer
    from lora_moe_core.inference.request import InferenceRequest
    from lora_moe_core.model.classifier import save_classifier, train_classifier
    from lora_moe_core.model.wan import task_linear_shapes
    from lora_moe_core.redaction import redact
    from lora_moe_core.tracking.links import experiment_link
    from lora_moe_core.training.run import run_training

    out = check_output_folder(output_dir, "output_dir")
    # one MLflow store for both stages, so the runs compare side by side in `mlflow ui`
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out.resolve() / 'mlruns.db'}")
    out.mkdir(parents=True, exist_ok=True)
    data, cache, heldout, heldout_cache = out / "data", out / "cache", out / "heldout", out / "heldout_cache"
    stage1, stage2 = out / "vanilla_lora", out / "lora_moe_stage_b"
    settings = CacheSettings(task="tiny")
    _step("1 synthetic clips")
    generate_dataset(data, num_videos, seed=seed)
    _step("2 caption labels")
    print("\n".join(label_dataset(str(data), str(data / "labels.jsonl")).lines()))
    _step("3 latent cache")
    print(cache_dataset(str(data), str(cache), settings, str(data / "labels.jsonl")).line(str(data), str(cache)))
    _step("4 instrument classifier")
    classifier, report = train_classifier(read_cache(str(cache)), seed=seed)
    save_classifier(classifier, out / "classifier.safetensors", report)
    print(report.line(out / "classifier.safetensors"))
    _step("5 Stage 1")
    run_training(load_config(DEMO_CONFIGS / "vanilla_lora.toml", {"cache": str(cache), "output_dir": str(stage1),
                                                                    "seed": seed}))  # fmt: skip
    _step("6 Stage 2")
    stage1_lora = str(stage1 / "lora_final.safetensors")
    checkpoint = Path(run_training(load_config(DEMO_CONFIGS / "lora_moe_stage_b_merged.toml", {
        "cache": str(cache), "base_lora_weights": stage1_lora, "output_dir": str(stage2), "seed": seed})))  # fmt: skip
    _step("7 per-instrument export")
    network = load_network(checkpoint, task_linear_shapes("tiny"))
    paths, _ = export_instrument_lora(network, ["Hook"], out / "export", "comfy")
    print("\n".join(f"wrote {path}" for path in paths))
    _step("8 held-out clips and cache")
    generate_dataset(heldout, 8, seed=seed + 1)
    print(cache_dataset(str(heldout), str(heldout_cache), settings).line(str(heldout), str(heldout_cache)))
    _step("9 evaluation")
    run_evaluation(EvaluationSettings(task="tiny", lora_moe_weights=str(checkpoint), base_lora_weights=stage1_lora,
                                      cache=str(heldout_cache), output_dir=str(out / "evaluation"),
                                      classifier_weights=str(out / "classifier.safetensors"), samples_per_family=1,
                                      sample_steps=4))  # fmt: skip
    _step("10 inference")
    run_infer(InferenceRequest(prompt=family("Hook").sample_prompt, instrument_hint=family("Hook").hint, task="tiny",
                               lora_moe_weights=str(checkpoint), num_frames=17, height=64, width=64,
                               num_inference_steps=8, output_path=str(out / "output.mp4")))  # fmt: skip
    error = _diffusers_parity(checkpoint, paths[-1], ["Hook"])
    print(f"\n[11] diffusers' own loader on {paths[-1].name} reproduces the LoRA-MoE at t=950: rel. error {error:.1e}")
    print(f"\ndone. Stage-2 checkpoint: {checkpoint}")
    print(f"      exported LoRAs:     {out / 'export'}")
    print(f"      evaluation report:  {out / 'evaluation' / 'report.html'}")
    print(f"      generated video:    {out / 'output.mp4'}")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"      MLflow runs:        {experiment_link(uri, EXPERIMENT) or redact(uri)}")
