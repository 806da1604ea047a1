"""DiT single files load as views of the file's pages: the same model as diffusers' ``from_single_file``, no copy.

Issue 21: two 28 GB Wan2.2-A14B DiTs must load in at most 1.3× their bf16 size of host memory. The memory test
measures a subprocess's peak RSS (``VmHWM``, reset with ``clear_refs``) around the load of a ~200 MB DiT file,
for our loader and for diffusers' reader, whose copy of every tensor the bound must catch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.errors import UserError
from lora_moe_core.formats.mapped import map_safetensors
from lora_moe_core.model.loading import save_tiny_single_files
from lora_moe_core.model.single_file import _config_folder, dit_config, dit_to_original, mapped_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    paths = save_tiny_single_files(folder)  # fp32 files
    tensors = map_safetensors(paths["dit"], "test")
    paths["dit_bf16"] = folder / "dit_bf16.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in tensors.items()}, paths["dit_bf16"])
    return paths


def _all_tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize(("file", "dtype"), [("dit", torch.float32), ("dit", torch.bfloat16),
                                             ("dit", torch.float16), ("dit_bf16", torch.bfloat16),
                                             ("dit_bf16", torch.float32)])  # fmt: skip
def test_mapped_dit_equals_diffusers_from_single_file(files, file, dtype):
    from diffusers import WanTransformer3DModel

    config = dit_config("tiny", None)
    ours = _all_tensors(mapped_dit(Path(files[file]), "dit", config, dtype))
    with tempfile.TemporaryDirectory() as scratch:
        reference = WanTransformer3DModel.from_single_file(
            str(files[file]), config=_config_folder(config, "transformer", scratch), subfolder="transformer",
            torch_dtype=dtype, local_files_only=True,
        )  # fmt: skip
    theirs = _all_tensors(reference)
    assert ours.keys() == theirs.keys() and len(ours) > 100
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(side, 16) for side in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_weights_in_the_files_dtype_are_views_of_the_file_not_copies(files):
    path = Path(files["dit_bf16"]).resolve()
    model = mapped_dit(path, "dit", dit_config("tiny", None), torch.bfloat16)
    ranges = _file_mappings(path)
    params = list(model.parameters())
    assert len(ranges) >= len(params) > 100  # one private mapping per tensor
    inside = [any(start <= p.data_ptr() < end for start, end in ranges) for p in params]
    assert all(inside)  # every weight lives in the file's pages: no anonymous copy exists
    with torch.no_grad():
        before = params[0].clone()
        params[0].add_(1.0)  # a merge writes into weights: private mappings keep it from the file
    assert torch.equal(map_safetensors(path, "test")[_original_name(model, params[0])], before)
    del model, params
    assert _file_mappings(path) == []  # the mappings close with the last view


def _original_name(model, param) -> str:
    name = next(key for key, value in model.named_parameters() if value is param)
    return next(iter(dit_to_original({name: param})))


def test_corrupt_offsets_are_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(4, 4)}, path)
    raw = bytearray(path.read_bytes())
    raw[8:] = raw[8:].replace(b"[0,64]", b"[0,96]")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not fit its offsets"):
        map_safetensors(path, "--dit weights file")


# ~100 M parameters: the file (200 MB in bf16) dominates what else the process allocates while loading
MEDIUM = {"num_attention_heads": 8, "attention_head_dim": 128, "ffn_dim": 4096, "num_layers": 6, "text_dim": 64}
# Load, then quantise the block linears to fp8 as DiTPlacement does for --fp8_base (on the GPU the same goes for
# moving and pinning): each bf16 original is dropped as its fp8 copy is made. RSS (VmRSS, VmHWM) counts the file's
# pages while they are mapped.
_MEASURE = """
import json, sys, tempfile, torch
from pathlib import Path
from lora_moe_core.model.memory import quantize_blocks_fp8
from lora_moe_core.model.single_file import _config_folder, mapped_dit
config, path, way = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def kib(field):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))
from diffusers import WanTransformer3DModel
scratch = tempfile.mkdtemp()
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
before = kib("VmRSS")
if way == "ours":
    model = mapped_dit(path, "dit", config, torch.bfloat16)
else:
    model = WanTransformer3DModel.from_single_file(str(path), config=_config_folder(config, "transformer", scratch),
        subfolder="transformer", torch_dtype=torch.bfloat16, local_files_only=True)
quantize_blocks_fp8(model)
print(json.dumps({"peak": (kib("VmHWM") - before) * 1024, "after": (kib("VmRSS") - before) * 1024,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def _measure(config: dict, path: Path, way: str) -> dict:
    # glibc's adaptive mmap threshold would keep freed 16 MB temporaries in the heap and blur the page count
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(config), str(path), way],
                            capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_host_memory_of_a_dit_load_and_fp8_quantisation_stays_under_1_3x_the_file(tmp_path):
    from diffusers import WanTransformer3DModel

    config = {**dit_config("tiny", None), **MEDIUM}
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(config).to(torch.bfloat16)
    path = tmp_path / "medium_dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit_to_original(model.state_dict()).items()}, path)
    size = path.stat().st_size
    del model
    ours, theirs = _measure(config, path, "ours"), _measure(config, path, "diffusers")
    assert ours["params"] == theirs["params"] > 90_000_000
    assert ours["peak"] <= 1.3 * size, ours["peak"] / size
    assert ours["after"] <= 0.7 * size, ours["after"] / size  # fp8 blocks (half the bytes) and the small rest
    # diffusers' reader keeps the whole file mapped while any tensor of it lives: the bf16 pages stay beside fp8
    assert theirs["after"] >= 1.2 * size, theirs["after"] / size
