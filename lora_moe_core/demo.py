"""A tiny end-to-end tour of the core library on CPU (what ``make run`` runs until the pipeline lands).

Steps: a Stage-1 LoRA in musubi format (random weights standing in for the user's) → converted to ComfyUI and
diffusers keys → a LoRA-MoE on both tiny Wan2.2 DiTs with that LoRA frozen as its base → a few AdamW steps on
random latents (flow matching + teacher KL) → checkpoint saved and reloaded with validation → routing for the
seed's hint and prompt → per-instrument LoRA export, loaded by diffusers and compared with the LoRA-MoE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_moe_core.checkpoint import load_network, save_checkpoint
from lora_moe_core.config import load_config
from lora_moe_core.export import export_instrument_lora
from lora_moe_core.families import FAMILIES
from lora_moe_core.lora_formats import LoRAFile, convert_lora_file, write_lora
from lora_moe_core.network import LoRAMoENetwork, LoRANetwork, build_network
from lora_moe_core.routing import teacher_distribution
from lora_moe_core.vocabulary import Vocabulary, instrument_logits, parse_instrument_hint
from lora_moe_core.wan import build_transformer, get_task, linear_shapes, resolve_targets

DEMO_STEPS = 20


def _fake_stage1(out: Path, transformer: torch.nn.Module, seed: int) -> Path:
    """Write a musubi-format Stage-1 LoRA with random (non-zero) weights on the seed's targets."""
    config = load_config(None, {"task": "tiny"})
    network = LoRANetwork(resolve_targets(config.lora, len(transformer.blocks)), linear_shapes(transformer), 1.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=generator) * 0.05)
    path = out / "vanilla_lora" / "lora_final.safetensors"
    write_lora(LoRAFile(modules=network.to_modules()), path, to="musubi")
    return path


def _batch(generator: torch.Generator, family: int) -> dict[str, torch.Tensor]:
    latents = torch.randn(1, 16, 3, 8, 8, generator=generator) * 0.5
    latents[:, family * 4 : family * 4 + 4] += 1.0  # each family shifts its own channels: something to specialise on
    return {"latents": latents, "text": torch.randn(1, 12, 16, generator=generator)}


def _train_a_few_steps(network: LoRAMoENetwork, dits: dict[str, torch.nn.Module], boundary: float, seed: int) -> float:
    network.set_trainable("stage_b")
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(DEMO_STEPS):
        family = step % len(FAMILIES)
        batch = _batch(generator, family)
        t = torch.rand(1, generator=generator)
        noise = torch.randn(batch["latents"].shape, generator=generator)
        noisy = (1 - t) * batch["latents"] + t * noise  # flow matching: x_t = (1-t)·x0 + t·ε, target ε - x0
        logits = instrument_logits([FAMILIES[family]])[None]
        gates = network.set_routing(logits)
        dit = dits["high"] if t.item() >= boundary else dits["low"]
        prediction = dit(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=batch["text"], return_dict=False)
        teacher = teacher_distribution(logits, 1.0, 0.1)
        kl = (gates.clamp_min(1e-8) * (gates.clamp_min(1e-8).log() - teacher.log())).sum()
        loss = torch.nn.functional.mse_loss(prediction[0], noise - batch["latents"]) + 0.1 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.requires_grad_(False)
    return loss.item()


def _diffusers_parity(network: LoRAMoENetwork, families: list[str], exported: Path, seed: int) -> float:
    """Relative difference between the LoRA-MoE and diffusers running the exported high-noise LoRA."""
    from diffusers import WanPipeline

    generator = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([950.0]),
              "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator), "return_dict": False}  # fmt: skip
    ours = build_transformer("tiny", seed=seed)
    network.apply_to(ours)
    network.set_routing(instrument_logits(families))
    expected = ours(**inputs)[0]
    theirs = build_transformer("tiny", seed=seed)
    theirs.load_lora_adapter(WanPipeline.lora_state_dict(str(exported)), prefix="transformer", adapter_name="demo")
    return ((theirs(**inputs)[0] - expected).norm() / expected.norm()).item()


def run_demo(output_dir: str | Path, seed: int = 0) -> None:
    """Run the tour and print where everything went."""
    out = Path(output_dir)
    task = get_task("tiny")
    dits = {"high": build_transformer("tiny", seed=seed), "low": build_transformer("tiny", seed=seed + 1)}
    stage1 = _fake_stage1(out, dits["high"], seed)
    print(f"[1] Stage-1 LoRA (musubi keys, random stand-in for yours): {stage1}")
    for fmt in ("comfy", "diffusers"):
        converted = out / "vanilla_lora" / f"lora_final_{fmt}.safetensors"
        convert_lora_file(stage1, fmt, converted)
        print(f"[2] converted to {fmt}: {converted}")

    config = load_config(None, {"task": "tiny", "base_lora_weights": str(stage1)})
    network = build_network(config, dits["high"])
    for dit in dits.values():
        network.apply_to(dit)
    experts = sum(p.numel() for p in network.experts.parameters())
    print(f"[3] LoRA-MoE on both DiTs: {len(network.experts)} expert modules ({experts} params), "
          f"{len(network.base_loras)} frozen base modules")  # fmt: skip
    final_loss = _train_a_few_steps(network, dits, task.boundary_ratio, seed)
    print(f"[4] {DEMO_STEPS} AdamW steps on random latents (the real trainer comes with `lora-moe train`); "
          f"last loss {final_loss:.4f}")  # fmt: skip

    checkpoint = save_checkpoint(network, out / "lora_moe_stage_b" / "lora_moe_final.safetensors")
    network = load_network(checkpoint, linear_shapes(build_transformer("tiny", seed=seed)))
    print(f"[5] checkpoint saved and reloaded with validation: {checkpoint}")

    hint = parse_instrument_hint("Hook/Electrocautery")
    prompt = Vocabulary.from_builtin().match("电凝钩切割组织")
    for source, families in (("hint 'Hook/Electrocautery'", hint), ("prompt '电凝钩切割组织'", prompt.families)):
        gates = network.set_routing(instrument_logits(families))[0]
        shown = ", ".join(f"{name} {value:.2f}" for name, value in zip(FAMILIES, gates.tolist(), strict=True))
        print(f"[6] gates from {source}: {shown}")

    paths, _ = export_instrument_lora(network, hint, out / "export", to="comfy", alpha_base=0.7, alpha_expert=1.0)
    print(f"[7] per-instrument LoRA(s) for ComfyUI: {', '.join(str(p) for p in paths)}")
    error = _diffusers_parity(network, hint, paths[-1], seed)
    print(f"[8] diffusers' own loader on {paths[-1].name} reproduces the LoRA-MoE at t=950: rel. error {error:.1e}")
    print(f"done: everything is under {out}/")
