"""LoRA format conversion: ΔW preserved on every path, exact key names, diffusers loads our files, bad input."""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.errors import UserError
from lora_moe_core.formats.lora_files import (
    DIFFUSERS_METADATA_KEY,
    FORMATS,
    LoRAFile,
    LoRAModuleWeights,
    convert_lora_file,
    detect_format,
    diffusers_to_original,
    musubi_to_original,
    original_to_diffusers,
    original_to_musubi,
    read_lora,
    write_lora,
)

# (in, out) of every LoRA-able Linear of the tiny WanTransformer3DModel below: inner dim 24, ffn 32, text 16.
BLOCK_DIMS = {
    **{f"attn{a}.{p}": (24, 24) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "ffn.net.0.proj": (24, 32),
    "ffn.net.2": (32, 24),
}
TOP_DIMS = {
    "condition_embedder.text_embedder.linear_1": (16, 24),
    "condition_embedder.text_embedder.linear_2": (24, 24),
    "condition_embedder.time_embedder.linear_1": (256, 24),
    "condition_embedder.time_embedder.linear_2": (24, 24),
    "condition_embedder.time_proj": (24, 144),
    "proj_out": (24, 64),
}


def make_lora(spec: dict[str, tuple[int, float | None]], seed: int = 0, dtype=torch.float32) -> LoRAFile:
    """spec: diffusers module name -> (rank, alpha); alpha None means 'no alpha', i.e. alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (rank, alpha) in spec.items():
        fan_in, fan_out = TOP_DIMS.get(name) or BLOCK_DIMS[name.split(".", 2)[2]]
        down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=gen) * 0.3  # non-zero so ΔW (and the test) has teeth
        modules[name] = LoRAModuleWeights(down.to(dtype), up.to(dtype), float(rank if alpha is None else alpha))
    return LoRAFile(modules=modules, format="musubi", dtype=dtype, metadata={"ss_network_dim": "4"})


def partial_spec(blocks=(2, 3)) -> dict:
    """The brief's LoRA: last blocks only, to_q rank 8, other attn1 + ffn.net.0.proj rank 4, mixed alphas."""
    spec = {}
    for b in blocks:
        spec[f"blocks.{b}.attn1.to_q"] = (8, 1.0)
        spec[f"blocks.{b}.attn1.to_k"] = (4, 3.0)
        spec[f"blocks.{b}.attn1.to_v"] = (4, None)
        spec[f"blocks.{b}.attn1.to_out.0"] = (4, 1.0)
        spec[f"blocks.{b}.ffn.net.0.proj"] = (4, 2.0)
    return spec


def full_spec(blocks=(0, 1, 2, 3), top: bool = False) -> dict:
    """musubi-style: all 10 block Linears, per-module ranks and alphas (1.0, 3.0, none); optional top-level."""
    ranks, alphas = itertools.cycle((2, 4, 8)), itertools.cycle((1.0, 3.0, None, 1.0))
    spec = {f"blocks.{b}.{m}": (next(ranks), next(alphas)) for b in blocks for m in BLOCK_DIMS}
    if top:
        spec.update({name: (next(ranks), next(alphas)) for name in TOP_DIMS})
    return spec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_same_delta(got: LoRAFile, want: LoRAFile, tol: float) -> None:
    assert set(got.modules) == set(want.modules)
    for name, mod in want.modules.items():
        err = rel_err(got.modules[name].delta_weight(), mod.delta_weight())
        assert err <= tol, f"{name}: ΔW rel err {err:.2e} > {tol:.0e}"


def one_line_user_error(excinfo, *words: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


# ---------------------------------------------------------------- conversions keep ΔW

TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("src,dst", list(itertools.product(FORMATS, FORMATS)))
def test_every_conversion_path_keeps_delta_weight(tmp_path, src, dst, dtype):
    lora = make_lora(full_spec(top=True), seed=1)
    write_lora(lora, tmp_path / "src.safetensors", to=src)
    mid = read_lora(tmp_path / "src.safetensors")
    assert mid.format == src and mid.dtype == torch.float32
    assert_same_delta(mid, lora, 1e-6)
    back = convert_lora_file(tmp_path / "src.safetensors", dst, tmp_path / "dst.safetensors", dtype=dtype)
    assert back.format == src
    out = read_lora(tmp_path / "dst.safetensors")
    assert out.format == dst and out.dtype == dtype
    assert_same_delta(out, lora, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_power_of_two_scales_are_exact_in_half_precision(tmp_path, dtype):
    # alpha/rank = 1/4, 1/8, 2, 1 (absent alpha): baking into bf16/fp16 diffusers weights must not round.
    spec = {
        "blocks.2.attn1.to_q": (4, 1.0),
        "blocks.2.attn1.to_k": (8, 1.0),
        "blocks.3.ffn.net.2": (4, 8.0),
        "blocks.3.attn2.to_v": (2, None),
        "proj_out": (4, 1.0),
    }
    lora = make_lora(spec, seed=2, dtype=dtype)
    for mod in lora.modules.values():  # keep |x| >= 2^-6 so that x/8 never lands in fp16's subnormal range
        for t in (mod.down, mod.up):
            t.copy_(torch.where(t.abs() < 2**-6, torch.full_like(t, 2**-6), t))
    paths = [("musubi", "diffusers"), ("diffusers", "comfy"), ("comfy", "musubi"), ("musubi", "musubi")]
    for i, (src, dst) in enumerate(paths):
        write_lora(lora, tmp_path / f"{i}a.safetensors", to=src)
        convert_lora_file(tmp_path / f"{i}a.safetensors", dst, tmp_path / f"{i}b.safetensors")
        out = read_lora(tmp_path / f"{i}b.safetensors")
        assert out.dtype == dtype
        for name, mod in lora.modules.items():
            assert torch.equal(out.modules[name].delta_weight(), mod.delta_weight()), (src, dst, name)


def test_musubi_comfy_keep_tensors_and_alpha_bitwise(tmp_path):
    lora = make_lora(full_spec(), seed=3, dtype=torch.bfloat16)
    write_lora(lora, tmp_path / "m.safetensors", to="musubi")
    convert_lora_file(tmp_path / "m.safetensors", "comfy", tmp_path / "c.safetensors")
    out = read_lora(tmp_path / "c.safetensors")
    for name, mod in lora.modules.items():
        got = out.modules[name]
        assert torch.equal(got.down, mod.down) and torch.equal(got.up, mod.up) and got.alpha == mod.alpha
    assert out.metadata["ss_network_dim"] == "4"  # source metadata is carried over


def test_missing_or_zero_alpha_means_alpha_equals_rank(tmp_path):
    gen = torch.Generator().manual_seed(4)
    sd = {
        "lora_unet_blocks_2_self_attn_q.lora_down.weight": torch.randn(4, 24, generator=gen),
        "lora_unet_blocks_2_self_attn_q.lora_up.weight": torch.randn(24, 4, generator=gen),
        "lora_unet_blocks_2_ffn_0.lora_down.weight": torch.randn(8, 24, generator=gen),
        "lora_unet_blocks_2_ffn_0.lora_up.weight": torch.randn(32, 8, generator=gen),
        "lora_unet_blocks_2_ffn_0.alpha": torch.tensor(0.0, dtype=torch.bfloat16),
        "lora_unet_blocks_3_ffn_2.lora_down.weight": torch.randn(4, 32, generator=gen),
        "lora_unet_blocks_3_ffn_2.lora_up.weight": torch.randn(24, 4, generator=gen),
        "lora_unet_blocks_3_ffn_2.alpha": torch.tensor([3.0]),
    }  # 1-element alpha is accepted too
    save_file(sd, tmp_path / "a.safetensors")
    lora = read_lora(tmp_path / "a.safetensors")
    assert lora.modules["blocks.2.attn1.to_q"].alpha == 4.0
    assert lora.modules["blocks.2.ffn.net.0.proj"].alpha == 8.0
    assert lora.modules["blocks.3.ffn.net.2"].alpha == 3.0 and lora.modules["blocks.3.ffn.net.2"].scale == 0.75


# ---------------------------------------------------------------- key names and name mapping


def test_key_names_per_format(tmp_path):
    lora = make_lora(
        {
            **partial_spec(),
            "blocks.3.attn2.to_out.0": (4, 1.0),
            "blocks.3.ffn.net.2": (4, 1.0),
            "condition_embedder.time_proj": (4, 2.0),
            "proj_out": (4, 1.0),
        }
    )
    keys = {}
    for fmt in FORMATS:
        write_lora(lora, tmp_path / f"{fmt}.safetensors", to=fmt)
        keys[fmt] = _keys(tmp_path / f"{fmt}.safetensors")
        assert set(read_lora(tmp_path / f"{fmt}.safetensors").modules) == set(lora.modules)
        assert detect_format(keys[fmt]) == fmt
    assert {
        "lora_unet_blocks_2_self_attn_q.lora_down.weight",
        "lora_unet_blocks_2_self_attn_q.lora_up.weight",
        "lora_unet_blocks_2_self_attn_q.alpha",
        "lora_unet_blocks_3_ffn_0.lora_up.weight",
        "lora_unet_blocks_3_self_attn_o.alpha",
        "lora_unet_blocks_3_cross_attn_o.lora_down.weight",
        "lora_unet_blocks_3_ffn_2.alpha",
        "lora_unet_time_projection_1.alpha",
        "lora_unet_head_head.lora_up.weight",
    } <= keys["musubi"]
    assert {
        "diffusion_model.blocks.2.self_attn.q.lora_down.weight",
        "diffusion_model.blocks.2.self_attn.k.alpha",
        "diffusion_model.blocks.3.ffn.0.lora_up.weight",
        "diffusion_model.blocks.3.cross_attn.o.alpha",
        "diffusion_model.time_projection.1.lora_down.weight",
        "diffusion_model.head.head.lora_up.weight",
    } <= keys["comfy"]
    # Top-level modules are written with the scale baked in (diffusers' converter rejects a top-level alpha).
    assert "diffusion_model.head.head.alpha" not in keys["comfy"]
    assert {
        "transformer.blocks.2.attn1.to_q.lora_A.weight",
        "transformer.blocks.2.attn1.to_out.0.lora_B.weight",
        "transformer.blocks.3.ffn.net.0.proj.lora_A.weight",
        "transformer.blocks.3.attn2.to_out.0.lora_B.weight",
        "transformer.condition_embedder.time_proj.lora_A.weight",
        "transformer.proj_out.lora_B.weight",
    } <= keys["diffusers"]
    assert not any("alpha" in k for k in keys["diffusers"])
    assert len(keys["musubi"]) == 3 * len(lora.modules) and len(keys["diffusers"]) == 2 * len(lora.modules)


def _keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_detect_format_accepts_documented_variants():
    assert detect_format(["blocks.3.attn1.to_q.lora_A.weight", "blocks.3.attn1.to_q.lora_B.weight"]) == "diffusers"
    assert (
        detect_format(
            [
                "diffusion_model.blocks.3.self_attn.q.lora_A.weight",
                "diffusion_model.blocks.3.self_attn.q.lora_B.weight",
                "diffusion_model.blocks.3.self_attn.q.alpha",
            ]
        )
        == "comfy"
    )
    assert detect_format(["lora_unet_blocks_39_cross_attn_k_img.lora_down.weight"]) == "musubi"


def test_module_name_mapping():
    assert musubi_to_original("lora_unet_blocks_12_cross_attn_k_img") == "blocks.12.cross_attn.k_img"
    assert musubi_to_original("lora_unet_blocks_0_self_attn_o") == "blocks.0.self_attn.o"
    assert musubi_to_original("lora_unet_time_projection_1") == "time_projection.1"
    assert musubi_to_original("lora_unet_text_embedding_2") == "text_embedding.2"
    assert original_to_diffusers("blocks.12.cross_attn.v_img") == "blocks.12.attn2.add_v_proj"
    assert original_to_diffusers("blocks.5.ffn.0") == "blocks.5.ffn.net.0.proj"
    assert original_to_diffusers("time_embedding.0") == "condition_embedder.time_embedder.linear_1"
    assert diffusers_to_original("blocks.7.attn1.to_out.0") == "blocks.7.self_attn.o"
    assert diffusers_to_original("proj_out") == "head.head"
    names = [f"blocks.39.{m}" for m in (*BLOCK_DIMS, "attn2.add_k_proj", "attn2.add_v_proj")] + list(TOP_DIMS)
    for name in names:  # diffusers -> original -> musubi -> original -> diffusers is the identity
        assert original_to_diffusers(musubi_to_original(original_to_musubi(diffusers_to_original(name)))) == name
    for bad in ("lora_unet_blocks_1_self_attn_x", "lora_unet_blocks_1_norm3"):
        with pytest.raises(UserError):
            musubi_to_original(bad)
    with pytest.raises(UserError):
        diffusers_to_original("blocks.1.attn1.norm_q")


# ---------------------------------------------------------------- diffusers metadata


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    ).eval()


def peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        name: layer.get_delta_weight(adapter).detach().float()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A
    }


def test_diffusers_adapter_metadata_is_honoured(tmp_path):
    from peft import LoraConfig

    model = tiny_wan()
    targets = ["blocks.3.attn1.to_q", "blocks.3.attn1.to_k", "blocks.2.ffn.net.2", "proj_out"]
    model.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=2,
            target_modules=targets,
            rank_pattern={"blocks.3.attn1.to_q": 8},
            alpha_pattern={"blocks.3.attn1.to_q": 16, "proj_out": 1},
        ),
        adapter_name="default",
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    want = peft_deltas(model, "default")
    model.save_lora_adapter(tmp_path, adapter_name="default")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    assert lora.format == "diffusers" and DIFFUSERS_METADATA_KEY in lora.metadata
    assert lora.modules["blocks.3.attn1.to_q"].scale == 2.0 and lora.modules["proj_out"].scale == 0.25
    for name, delta in want.items():
        assert rel_err(lora.modules[name].delta_weight(), delta) < 1e-6
    # A pipeline save prefixes both the keys and the metadata entries with "transformer.".
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sd = {f"transformer.{k}": f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[DIFFUSERS_METADATA_KEY])
    save_file(
        sd,
        tmp_path / "pipe.safetensors",
        {DIFFUSERS_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in meta.items()})},
    )
    assert_same_delta(read_lora(tmp_path / "pipe.safetensors"), lora, 1e-7)
    # Converting drops the stale LoraConfig: the scale is now carried by alpha (or baked in).
    convert_lora_file(path, "diffusers", tmp_path / "d.safetensors")
    assert DIFFUSERS_METADATA_KEY not in read_lora(tmp_path / "d.safetensors").metadata
    assert_same_delta(read_lora(tmp_path / "d.safetensors"), lora, 1e-6)


# ---------------------------------------------------------------- diffusers loads what we write


@pytest.fixture(scope="module")
def wan_and_inputs():
    gen = torch.Generator().manual_seed(7)
    inputs = {
        "hidden_states": torch.randn(1, 16, 2, 4, 4, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=gen),
        "return_dict": False,
    }
    return tiny_wan(), inputs


@pytest.mark.parametrize("variant", ["last_blocks", "last_blocks_full_plus_top"])
@pytest.mark.parametrize("fmt", ["comfy", "diffusers"])
def test_diffusers_loads_our_file_with_same_delta(tmp_path, wan_and_inputs, fmt, variant):
    from diffusers import WanPipeline

    base, inputs = wan_and_inputs
    spec = partial_spec() if variant == "last_blocks" else full_spec(blocks=(2, 3), top=True)
    lora = make_lora(spec, seed=5)
    # The musubi file of a last-blocks-only LoRA is fine for our reader (diffusers' musubi converter is not).
    write_lora(lora, tmp_path / "musubi.safetensors", to="musubi")
    convert_lora_file(tmp_path / "musubi.safetensors", fmt, tmp_path / "out.safetensors")

    sd = WanPipeline.lora_state_dict(str(tmp_path / "out.safetensors"))  # 0.42.1: a dict, not a tuple
    assert isinstance(sd, dict) and all(k.startswith("transformer.blocks.") for k in sd if "blocks" in k)
    model = copy.deepcopy(base)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="x")
    deltas = peft_deltas(model, "x")
    assert set(deltas) == set(lora.modules)
    for name, delta in deltas.items():
        assert rel_err(delta, lora.modules[name].delta_weight()) < 1e-6, name

    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in lora.modules.items():
            ref.get_submodule(name).weight += mod.delta_weight()
        out_base, out_ref, out_lora = base(**inputs)[0], ref(**inputs)[0], model(**inputs)[0]
    assert rel_err(out_ref, out_base) > 1e-2  # the LoRA really changes the output
    assert rel_err(out_lora, out_ref) <= 1e-5


# ---------------------------------------------------------------- bad input


def small_musubi(tmp_path, name="ok.safetensors"):
    write_lora(make_lora(partial_spec()), tmp_path / name, to="musubi")
    return tmp_path / name


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as ei:
        read_lora(tmp_path / "nope.safetensors")
    one_line_user_error(ei, "does not exist", "nope.safetensors")


def test_truncated_safetensors(tmp_path):
    path = small_musubi(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as ei:
        read_lora(path)
    one_line_user_error(ei, "truncated")


def test_tensor_with_nan_names_the_key(tmp_path):
    sd = {
        "lora_unet_blocks_2_ffn_0.lora_down.weight": torch.zeros(4, 24),
        "lora_unet_blocks_2_ffn_0.lora_up.weight": torch.zeros(32, 4),
    }
    sd["lora_unet_blocks_2_ffn_0.lora_up.weight"][3, 1] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(UserError) as ei:
        read_lora(tmp_path / "nan.safetensors")
    one_line_user_error(ei, "NaN", "lora_unet_blocks_2_ffn_0.lora_up.weight")


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.q_proj.lora_A.weight",
        "transformer.blocks.0.attn1.to_q.lora_B.bias",
        "lora_unet_blocks_0_norm3.lora_down.weight",
    ],
)
def test_unrecognised_key_layout(tmp_path, key):
    save_file({key: torch.zeros(4, 24)}, tmp_path / "odd.safetensors")
    with pytest.raises(UserError) as ei:
        read_lora(tmp_path / "odd.safetensors")
    msg = one_line_user_error(ei, key)
    assert "unrecognised" in msg or "not a musubi" in msg


def test_unrecognised_layout_lists_the_three_layouts():
    with pytest.raises(UserError) as ei:
        detect_format(["lora_unet_blocks_0_self_attn_q.lora_down.weight", "something.else"])
    one_line_user_error(ei, "something.else", "musubi", "comfyui", "diffusers")


@pytest.mark.parametrize("zipfile", [True, False], ids=["torch.save", "legacy_pickle"])
def test_pickle_checkpoint_is_refused_without_loading(tmp_path, zipfile, monkeypatch):
    path = tmp_path / "evil.safetensors"
    torch.save(
        {"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=zipfile
    )
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load must never be called"))
    with pytest.raises(UserError) as ei:
        read_lora(path)
    one_line_user_error(ei, "pickle", "only .safetensors")


def test_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    sd = {
        "lora_unet_blocks_2_ffn_0.lora_down.weight": torch.ones(4, 24),
        "lora_unet_blocks_2_ffn_0.lora_up.weight": torch.ones(32, 4),
    }
    for pad in range(300):
        save_file(sd, tmp_path / "a.safetensors", {"pad": "x" * pad})
        if (tmp_path / "a.safetensors").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "a.safetensors").read_bytes()[:1] == b"\x80"
    assert read_lora(tmp_path / "a.safetensors").modules["blocks.2.ffn.net.0.proj"].rank == 4


def test_up_down_rank_mismatch(tmp_path):
    save_file(
        {
            "diffusion_model.blocks.2.self_attn.q.lora_down.weight": torch.zeros(4, 24),
            "diffusion_model.blocks.2.self_attn.q.lora_up.weight": torch.zeros(24, 8),
        },
        tmp_path / "r.safetensors",
    )
    with pytest.raises(UserError) as ei:
        read_lora(tmp_path / "r.safetensors")
    one_line_user_error(ei, "rank mismatch", "blocks.2.attn1.to_q", "lora_up.weight")


def test_missing_partner(tmp_path):
    save_file({"transformer.blocks.2.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, tmp_path / "p.safetensors")
    with pytest.raises(UserError) as ei:
        read_lora(tmp_path / "p.safetensors")
    one_line_user_error(ei, "no matching up", "lora_A.weight")


def test_write_refusals_leave_no_files(tmp_path):
    path = small_musubi(tmp_path)
    for kwargs, word in [
        ({"to": "kohya"}, "unknown LoRA format"),
        ({"to": "comfy", "dtype": torch.int8}, "int8"),
        ({"to": "comfy", "metadata": {"n": 3}}, "strings"),
    ]:
        with pytest.raises(UserError) as ei:
            write_lora(read_lora(path), tmp_path / "x.safetensors", **kwargs)
        one_line_user_error(ei, word)
    big = make_lora({"blocks.2.attn1.to_q": (4, 4.0)})
    big.modules["blocks.2.attn1.to_q"].up.fill_(1e5)  # fits fp32, overflows fp16
    with pytest.raises(UserError) as ei:
        write_lora(big, tmp_path / "x.safetensors", to="musubi", dtype=torch.float16)
    one_line_user_error(ei, "overflows")
    with pytest.raises(UserError) as ei:
        convert_lora_file(path, "comfy", str(path))
    one_line_user_error(ei, "is the input")
    assert sorted(os.listdir(tmp_path)) == ["ok.safetensors"]  # no output, no stray temp files
