"""musubi-tuner's single files (original Wan layout) load through diffusers' ``from_single_file`` to the same model.

The tiny model is written as the files a musubi user holds (two DiTs, the Wan2.1 VAE, a tensors-only UMT5 ``.pth``)
and loaded back through the loader real files go through; wrong files fail with one line.
"""

from __future__ import annotations

import math
import uuid

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lora_moe_core.errors import UserError
from lora_moe_core.model.loading import (
    build_tiny_encoders,
    build_tiny_single_file_vae,
    calibrate_latent_stats,
    encode_prompts,
    encode_video,
    load_dits,
    load_encoders,
    save_tiny_model,
    save_tiny_single_files,
)
from lora_moe_core.model.single_file import dit_to_original
from lora_moe_core.model.sources import ModelSource, resolve_model_file
from lora_moe_core.model.wan import build_transformer
from tests.helpers import assert_one_line_error, run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return {flag: str(path) for flag, path in save_tiny_single_files(tmp_path_factory.mktemp("musubi")).items()}


def _keys(path: str) -> set[str]:
    with safe_open(path, framework="pt") as handle:
        return set(handle.keys())


def test_files_are_in_the_original_wan_layout(files):
    dit = _keys(files["dit"])
    assert {"patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight",
            "head.head.weight", "head.modulation", "blocks.0.modulation", "blocks.3.self_attn.q.weight",
            "blocks.3.cross_attn.o.bias", "blocks.0.self_attn.norm_q.weight", "blocks.0.norm3.weight",
            "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias"} <= dit  # fmt: skip
    assert not any(key.startswith(("condition_embedder", "proj_out")) or ".attn1." in key for key in dit)
    vae = _keys(files["vae"])
    assert {"encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.middle.0.residual.0.gamma",
            "decoder.middle.1.to_qkv.weight", "decoder.upsamples.3.resample.1.weight",
            "decoder.upsamples.4.shortcut.weight", "encoder.head.2.weight"} <= vae  # fmt: skip
    t5 = torch.load(files["t5"], weights_only=True, mmap=True)  # tensors only: loads without unpickling code
    assert {"token_embedding.weight", "norm.weight", "blocks.1.attn.q.weight", "blocks.1.ffn.gate.0.weight",
            "blocks.1.ffn.fc1.weight", "blocks.1.pos_embedding.embedding.weight"} <= set(t5)  # fmt: skip


def test_dits_load_equal_to_the_originals(files, tiny_inputs):
    dits = load_dits("tiny", ModelSource(dit=files["dit"], dit_high_noise=files["dit_high_noise"]))
    for name, seed in (("high", 0), ("low", 1)):  # musubi: --dit is the low-noise DiT
        original = build_transformer("tiny", seed=seed)
        loaded = dits[name].state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in original.state_dict().items())
        torch.testing.assert_close(run(dits[name], tiny_inputs), run(original, tiny_inputs), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in dits["low"].parameters())


def test_vae_and_t5_load_equal_to_the_originals(files):
    encoders = load_encoders("tiny", ModelSource(vae=files["vae"], t5=files["t5"]))
    original_vae = build_tiny_single_file_vae(0)
    calibrate_latent_stats(original_vae)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.testing.assert_close(encode_video(encoders.vae, video), encode_video(original_vae, video), atol=1e-6, rtol=0)
    built = build_tiny_encoders()
    prompts = ["电凝钩切割组织", "a grasper and scissors"]
    for loaded, expected in zip(encode_prompts(encoders, prompts), encode_prompts(built, prompts), strict=True):
        torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    assert encoders.text_encoder.encoder.embed_tokens is encoders.text_encoder.shared


def _wan_t5_encoder(state: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int, buckets: int) -> torch.Tensor:
    """Wan's own ``T5Encoder`` forward (wan/modules/t5.py, umt5 with per-block position embeddings), in plain torch
    on the original-layout tensors: the reference the renamed transformers model must reproduce."""

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = buckets // 2
    bucket = (rel > 0).long() * half
    rel, exact = rel.abs(), half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(128 / exact) * (half - exact)).long()
    bucket = bucket + torch.where(rel < exact, rel, large.clamp(max=half - 1))
    x = state["token_embedding.weight"][ids]
    for i in range(len({k.split(".")[1] for k in state if k.startswith("blocks.")})):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = rms(x, p["norm1.weight"])
        q, k, v = (F.linear(h, p[f"attn.{n}.weight"]).unflatten(-1, (heads, -1)) for n in "qkv")
        bias = p["pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]  # [1, N, L, L]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attention = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attention, v).flatten(2), p["attn.o.weight"])
        h = rms(x, p["norm2.weight"])
        gate = F.gelu(F.linear(h, p["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, p["ffn.fc1.weight"]) * gate, p["ffn.fc2.weight"])
    return rms(x, state["norm.weight"])


def test_t5_key_mapping_reproduces_wans_encoder(files):
    encoders = load_encoders("tiny", ModelSource(t5=files["t5"]))
    tokens = encoders.tokenizer(["吸引器吸除积血", "hook"], padding="max_length", max_length=16, return_tensors="pt")
    state = torch.load(files["t5"], weights_only=True, mmap=True)
    config = encoders.text_encoder.config
    expected = _wan_t5_encoder(state, tokens.input_ids, tokens.attention_mask, config.num_heads,
                               config.relative_attention_num_buckets)  # fmt: skip
    with torch.no_grad():
        got = encoders.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_folder_and_single_files_mix(files, tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "tiny-wan")  # high = seed 0, low = seed 1
    other = build_transformer("tiny", seed=5)
    save_file({k: v.contiguous() for k, v in dit_to_original(other.state_dict()).items()}, tmp_path / "low.safetensors")
    dits = load_dits("tiny", ModelSource(model=str(folder), dit=str(tmp_path / "low.safetensors")))
    assert torch.equal(dits["low"].proj_out.weight, other.proj_out.weight)  # the file wins for its part
    assert torch.equal(dits["high"].proj_out.weight, build_transformer("tiny", seed=0).proj_out.weight)
    alone = load_dits("tiny", ModelSource(dit=files["dit"]))
    assert alone["high"] is alone["low"] and "only --dit given" in capsys.readouterr().err


def test_s3_single_file_is_cached_once(files, s3_env, tmp_path, monkeypatch):
    from lora_moe_core.storage.store import Storage

    monkeypatch.setenv("LORA_MOE_CACHE", str(tmp_path / "cache"))
    uri = f"s3://test/models/{uuid.uuid4().hex}/wan2.2_low.safetensors"
    Storage().upload(files["dit"], uri)
    local = resolve_model_file(uri, "dit")
    assert local.read_bytes() == open(files["dit"], "rb").read()
    assert Storage().sync_file_from(uri, local) is False  # unchanged: not downloaded again
    dits = load_dits("tiny", ModelSource(dit=uri))
    assert torch.equal(dits["low"].proj_out.weight, build_transformer("tiny", seed=1).proj_out.weight)


def test_wrong_files_fail_with_one_line(files, tmp_path, capsys):
    infer = ["infer", "--task", "tiny", "--prompt", "hook", "--num_inference_steps", "1", "--output_path",
             str(tmp_path / "x.mp4")]  # fmt: skip
    assert_one_line_error(capsys, [*infer, "--vae", files["dit"]], files["dit"], "holds a Wan DiT", "not a Wan VAE")
    assert_one_line_error(capsys, [*infer, "--dit", files["vae"]], "--dit", "Wan2.1 VAE", "not a Wan DiT")
    assert_one_line_error(capsys, [*infer, "--t5", files["dit_high_noise"]], "not a UMT5 text encoder")
    assert_one_line_error(capsys, [*infer, "--dit_high_noise", files["dit_high_noise"]], "needs --dit")
    original = dit_to_original(build_transformer("tiny").state_dict())
    truncated = {k: v for k, v in original.items() if k != "head.head.bias"}
    save_file({k: v.contiguous() for k, v in truncated.items()}, tmp_path / "truncated.safetensors")
    assert_one_line_error(capsys, [*infer, "--dit", str(tmp_path / "truncated.safetensors")],
                          "1 of the", "missing (first: proj_out.bias)")  # fmt: skip
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled module, not tensors
    assert_one_line_error(capsys, [*infer, "--t5", str(tmp_path / "module.pth")], "module.pth", "tensors-only")


def test_a_5b_dit_is_refused_for_a14b(tmp_path):
    shapes = {"patch_embedding.weight": (3072, 48, 1, 2, 2), "head.modulation": (1, 2, 3072),
              "blocks.0.self_attn.q.weight": (3072, 3072)}  # fmt: skip
    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, tmp_path / "ti2v_5B.safetensors")
    with pytest.raises(
        UserError,
        match=r"holds a Wan DiT \(dim 3072, 48 input channels.*TI2V-5B\), but task "
        r"t2v-A14B needs a Wan DiT with dim 5120 and 16 input channels",
    ):
        load_dits("t2v-A14B", ModelSource(dit=str(tmp_path / "ti2v_5B.safetensors")))
    with pytest.raises(UserError, match="--model is required for t2v-A14B.*--vae"):
        load_encoders("t2v-A14B", ModelSource(t5=str(tmp_path / "ti2v_5B.safetensors")))


def test_single_files_are_config_fields_and_train_flags(capsys):
    import json

    from lora_moe_core.cli.main import main

    assert main(["show-config", "--task", "tiny", "--dit", "low.safetensors", "--dit_high_noise", "high.safetensors",
                 "--vae", "wan_2.1_vae.safetensors", "--t5", "models_t5_umt5-xxl-enc-bf16.pth"]) == 0  # fmt: skip
    model = json.loads(capsys.readouterr().out)["model"]
    assert model == {"task": "tiny", "model": None, "dit": "low.safetensors", "dit_high_noise": "high.safetensors",
                     "vae": "wan_2.1_vae.safetensors", "t5": "models_t5_umt5-xxl-enc-bf16.pth",
                     "timestep_boundary": None}  # fmt: skip
    assert ModelSource.of(type("Cfg", (), model)).overrides()["dit"] == "low.safetensors"
