"""Hostile conditions, round 3: SIGTERM during training, Ctrl-C during caching, bad environment variables and
lying single-file weights.

What Kubernetes and torchrun users expect of a restartable trainer (SIGTERM: finish the step, save, exit 143,
resume to the same weights) and of a cache writer (Ctrl-C: no half entry, exit 130, the rerun completes), checked
through the real CLI in subprocesses with real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.cache.writer import LatentCacher
from lora_moe_core.cli.main import main
from lora_moe_core.data.latent_cache import read_cache
from lora_moe_core.data.synth import generate_dataset
from lora_moe_core.formats.safetensors_io import read_safetensors
from lora_moe_core.model.loading import save_tiny_single_files
from lora_moe_core.model.sources import load_tensor_pth
from lora_moe_core.signals import GracefulStop
from lora_moe_core.training import state as run_state
from tests.test_faults_training import (
    RUN,
    _assert_cache_whole,
    _assert_same_run,
    _one_line_error,
    _resumed_step,
    _stage2_argv,
    reference,
    stage1,
)

__all__ = ["reference", "stage1"]  # module fixtures shared with the fault tests: the same uninterrupted run


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.002)


# -- 1. SIGTERM during train -------------------------------------------------------------------------------------
def test_sigterm_saves_the_step_exits_143_and_resumes_to_identical_weights(tiny_cache, stage1, reference, tmp_path,
                                                                           capsys):  # fmt: skip
    run = tmp_path / "run"
    # saves every 2 steps: the SIGTERM comes during step 3, whose save only the stop writes
    argv = _stage2_argv(tiny_cache, stage1, run, *RUN, "--save_every_n_steps", "2")
    process = subprocess.Popen([sys.executable, "-m", "lora_moe_core", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(run / "training_state_step_2.json", process)
        process.send_signal(signal.SIGSTOP)  # held while the SIGTERM is queued: it lands early in step 3
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    stopped = int(last.removeprefix("stopped by SIGTERM after step ").removesuffix("; resume with --resume auto"))
    assert last == f"stopped by SIGTERM after step {stopped}; resume with --resume auto" and 3 <= stopped < 6
    assert not [name for name in os.listdir(run) if run_state.PARTIAL_FILE.match(name)]
    assert run_state.remove_partial_files(run) == 0
    assert run_state.find_resume(run, "auto") == run / f"training_state_step_{stopped}.json"
    assert run_state.check_save(run / f"training_state_step_{stopped}.json") is None
    assert not (run / "lora_moe_final.safetensors").exists()  # not mistaken for a finished run

    capsys.readouterr()
    assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
    assert _resumed_step(capsys.readouterr().out) == stopped
    _assert_same_run(run, reference)


GRACEFUL = """
import os, signal, sys, time
from lora_moe_core.signals import GracefulStop

with GracefulStop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    while stop.signal is None:
        time.sleep(0.001)
    print(stop.signal, flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(30)
print("not reached")
"""


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_a_second_signal_after_sigterm_ends_the_process_at_once(second):
    done = subprocess.run([sys.executable, "-c", GRACEFUL, second], capture_output=True, text=True, timeout=20)
    assert done.returncode == -getattr(signal, second), done.stderr
    assert done.stdout == "SIGTERM\n"


def test_graceful_stop_restores_the_handlers_it_replaced():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while stop.signal is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert stop.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int


# -- 2. Ctrl-C during cache ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 videos of 33 frames: each entry has a text file, a 17- and a 33-frame latent file and a marker."""
    folder = tmp_path_factory.mktemp("long") / "data"
    generate_dataset(folder, 6, seed=5, width=64, height=48, num_frames=33)
    return folder


def _cache_argv(dataset: Path, out: Path) -> list[str]:
    return ["cache", "--dataset", str(dataset), "--task", "tiny", "--output", str(out), "--target_frames", "17", "33",
            "--resolution", "64", "48"]  # fmt: skip


def test_ctrl_c_during_cache_exits_130_leaves_whole_entries_and_the_rerun_completes(long_videos, tmp_path, capsys):
    out = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-m", "lora_moe_core", *_cache_argv(long_videos, out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(out / "clip_0001_lora_moe.json", process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, err) == (130, "interrupted\n")
    done = _assert_cache_whole(out)  # every latent file loads, with its text file; no staging folder
    assert 2 <= len(done) < 6
    published = {path.name.split("_")[0] + "_" + path.name.split("_")[1] for path in out.glob("*_wan*.safetensors")}
    assert published == set(done)  # no file of an entry whose marker is missing
    assert main(_cache_argv(long_videos, out)) == 0
    assert f"{len(done)} up to date" in capsys.readouterr().out
    assert len(_assert_cache_whole(out)) == 6 and len(read_cache(str(out))) == 12


@pytest.mark.parametrize("at", ["publish", "staging cleanup"])
def test_ctrl_c_while_an_entry_is_published_or_its_staging_removed_waits_for_it(long_videos, tmp_path, monkeypatch,
                                                                                capsys, at):  # fmt: skip
    out, calls = tmp_path / "cache", []
    real_publish, real_rmtree = LatentCacher._publish, __import__("shutil").rmtree

    def publish(self, local, target):  # the real rename, with a real Ctrl-C just before the 2nd file of the 2nd entry
        calls.append(target)
        if at == "publish" and len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        real_publish(self, local, target)

    def rmtree(path, *args, **kwargs):  # the real removal, with a Ctrl-C as it starts on the 2nd entry's staging
        if at == "staging cleanup" and len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(LatentCacher, "_publish", publish)
    monkeypatch.setattr("shutil.rmtree", rmtree)
    assert main(_cache_argv(long_videos, out)) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert _assert_cache_whole(out) == ["clip_0000", "clip_0001"]  # the entry being published was finished
    assert {path.name.split("_w")[0][:9] for path in out.glob("*_wan*.safetensors")} == {"clip_0000", "clip_0001"}


# -- 3. Environment variables ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(folder, 2, seed=6, width=64, height=48, num_frames=17)
    return folder


def _s3_inputs(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A command per kind of s3:// download: a model file (cache --vae), a latent cache (train --cache). S3 is
    configured (a closed port: the check must come before any transfer is tried)."""
    for name, value in (("S3_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_ACCESS_KEY_ID", "key"),
                        ("AWS_SECRET_ACCESS_KEY", "secret")):  # fmt: skip
        monkeypatch.setenv(name, value)
    return {"model file": ["cache", "--task", "tiny", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "out"),
                           "--vae", "s3://models/wan_2.1_vae.safetensors"],
            "latent cache": ["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo" /
                             "vanilla_lora.toml"), "--cache", "s3://caches/train", "--output_dir",
                             str(tmp_path / "out")]}  # fmt: skip


@pytest.mark.parametrize("download", ["model file", "latent cache"])
def test_lora_moe_cache_naming_a_file_is_one_line(tiny_dataset, tmp_path, monkeypatch, capsys, download):
    (tmp_path / "a_file").write_text("not a folder")
    for value, where in ((tmp_path / "a_file", "it is"), (tmp_path / "a_file" / "below", f"{tmp_path / 'a_file'} is")):
        monkeypatch.setenv("LORA_MOE_CACHE", str(value))
        err = _one_line_error(capsys, _s3_inputs(tiny_dataset, tmp_path, monkeypatch)[download])
        assert err == (f"error: LORA_MOE_CACHE (where s3:// inputs are downloaded) {value}: {where} a file, not a "
                       "folder\n")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # no output folder made


@pytest.mark.parametrize("download", ["model file", "latent cache"])
def test_lora_moe_cache_that_cannot_be_written_is_one_line(tiny_dataset, tmp_path, monkeypatch, capsys, download):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        monkeypatch.setenv("LORA_MOE_CACHE", str(locked))
        err = _one_line_error(capsys, _s3_inputs(tiny_dataset, tmp_path, monkeypatch)[download])
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert err.startswith(f"error: LORA_MOE_CACHE (where s3:// inputs are downloaded) {locked}: cannot write in "
                          f"{locked}: ")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["locked"] and not os.listdir(locked)


# -- 4. Lying single-file weights --------------------------------------------------------------------------------
class _RunsCode:
    """A pickle that, unpickled, would create ``marker``: what a hostile .pth offers."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _tensor(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _huge_header(path: Path, claimed: int) -> Path:
    """A header length field of ``claimed`` bytes over a file that long (sparse: no disk used)."""
    with path.open("wb") as handle:
        handle.write(claimed.to_bytes(8, "little") + b'{"a":')
        handle.truncate(8 + claimed)
    return path


def _wrong_shape(source: str, path: Path, key: str) -> Path:
    tensors, _ = read_safetensors(source)
    tensors[key] = torch.zeros(*[n + 1 for n in tensors[key].shape])
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


HOSTILE = {  # name: (flag, how to build the file from the good tiny files and a folder, words the error holds)
    "offsets past the end": ("vae", lambda good, d: _raw_safetensors(
        d / "vae.safetensors", {"conv1.weight": _tensor("F32", [2, 2], 0, 64)}, b"\0" * 16), "not a valid"),
    "overlapping offsets": ("vae", lambda good, d: _raw_safetensors(
        d / "vae.safetensors", {"a": _tensor("F32", [2], 0, 8), "b": _tensor("F32", [2], 4, 12)}, b"\0" * 12),
        "not a valid"),
    "unknown dtype": ("dit", lambda good, d: _raw_safetensors(
        d / "dit.safetensors", {"patch_embedding.weight": _tensor("Q4", [2], 0, 8)}, b"\0" * 8), "not a valid"),
    "20 MiB header": ("dit", lambda good, d: _huge_header(d / "dit.safetensors", 20 << 20), "header of"),
    "100 MB header": ("vae", lambda good, d: _huge_header(d / "vae.safetensors", 100 << 20), "header of"),
    "pickle running code (zip)": ("t5", lambda good, d: _pickled(d / "t5.pth", d, True), "posix.system"),
    "pickle running code (legacy)": ("t5", lambda good, d: _pickled(d / "t5.pth", d, False), "posix.system"),
    "pickle as a dit": ("dit", lambda good, d: _pickled(d / "dit.pth", d, True), "could run code"),
    "VAE tensor of the wrong shape": ("vae", lambda good, d: _wrong_shape(good["vae"], d / "vae.safetensors",
                                                                          "conv1.weight"), "has shape"),
    "DiT tensor of the wrong shape": ("dit", lambda good, d: _wrong_shape(good["dit"], d / "dit.safetensors",
                                                                          "blocks.0.self_attn.q.weight"), "has shape"),
    "T5 tensor of the wrong shape": ("t5", lambda good, d: _wrong_shape_pth(good["t5"], d / "t5.pth"), "t5"),
    # a name that lies about the format: torch, safetensors and diffusers choose their reader by the suffix
    "T5 .pth named .safetensors": ("t5", lambda good, d: _renamed(good["t5"], d / "umt5-xxl-enc.safetensors"),
                                   "is a PyTorch checkpoint (torch.save zip, a .pth) under a .safetensors name"),
    "pre-1.6 T5 .pth named .safetensors": ("t5", lambda good, d: _legacy_pth(good["t5"], d / "t5.safetensors"),
                                           "is a PyTorch checkpoint (pre-1.6 torch.save pickle, a .pth)"),
    "VAE .safetensors named .pth": ("vae", lambda good, d: _renamed(good["vae"], d / "wan_2.1_vae.pth"),
                                    "is a safetensors file under a .pth name"),
    "T5 .safetensors named .pth": ("t5", lambda good, d: _as_safetensors(good["t5"], d / "t5.pth"),
                                   "is a safetensors file under a .pth name"),
    "a video as the T5": ("t5", lambda good, d: _renamed(Path(__file__).parent / "data" / "bad" / "ok.mp4",
                                                         d / "t5.pth"), "neither a safetensors file nor a PyTorch"),
}  # fmt: skip


def _renamed(source: str | Path, path: Path) -> Path:
    path.write_bytes(Path(source).read_bytes())
    return path


def _legacy_pth(source: str, path: Path) -> Path:
    torch.save(torch.load(source, weights_only=True), path, _use_new_zipfile_serialization=False)  # any name
    return path


def _as_safetensors(source: str, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in torch.load(source, weights_only=True).items()}, path)
    return path


def _pickled(path: Path, folder: Path, zipped: bool) -> Path:
    torch.save({"weight": _RunsCode(folder / "code_ran")}, path, _use_new_zipfile_serialization=zipped)
    return path


def _wrong_shape_pth(source: str, path: Path) -> Path:
    state = torch.load(source, weights_only=True)
    state["norm.weight"] = torch.zeros(state["norm.weight"].numel() + 1)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def good_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {flag: str(path) for flag, path in save_tiny_single_files(tmp_path_factory.mktemp("good")).items()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_lying_single_files_are_one_line_naming_the_file(case, good_files, tiny_dataset, tmp_path, capsys):
    flag, build, words = HOSTILE[case]
    (tmp_path / "in").mkdir()
    path = build(good_files, tmp_path / "in")
    commands = [["infer", "--task", "tiny", "--prompt", "hook", "--num_inference_steps", "1", "--output_path",
                 str(tmp_path / "out" / "x.mp4")]]  # fmt: skip
    if flag != "dit":  # caching encodes with the VAE and T5 only: it never reads a --dit
        commands.append(["cache", "--task", "tiny", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "out")])
    for command in commands:
        err = _one_line_error(capsys, [*command, f"--{flag}", str(path)])
        assert str(path) in err and words in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "in" / "code_ran").exists()


def test_the_hostile_pickle_really_runs_code_when_unpickled(tmp_path):
    """The check above is not vacuous: loaded without ``weights_only``, the same file creates its marker."""
    path = _pickled(tmp_path / "t5.pth", tmp_path, True)
    loader = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", loader, str(path)], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "code_ran").exists()


def test_a_tensors_only_pth_in_the_pre_1_6_format_still_loads(good_files, tmp_path):
    """That format cannot be memory-mapped: it is read instead, still with ``weights_only``."""
    state = torch.load(good_files["t5"], weights_only=True)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = load_tensor_pth(tmp_path / "legacy.pth", "t5")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)
