"""Fault injection: SIGKILL during training and during checkpoint writes, MLflow down, a full disk while caching.

The promises of restartable jobs (Kubernetes restarts a killed pod, torchrun restarts a worker and the script
resumes from its last checkpoint) and of object stores (MinIO: an object is whole or absent, checksummed), checked
on our own outputs: a run killed at any step and resumed ends with the same weights, bit for bit on CPU; a save
is whole or invisible, and a damaged one is skipped for the one before; tracking never stops a run and loses
nothing; a full disk ends caching with one line and leaves no corrupt entry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from lora_moe_core.cli.main import main
from lora_moe_core.data.latent_cache import LATENT_FILE, read_cache
from lora_moe_core.data.synth import generate_dataset
from lora_moe_core.errors import disk_full_reason
from lora_moe_core.formats.safetensors_io import read_safetensors
from lora_moe_core.tracking import tracker as tracking
from lora_moe_core.tracking.mlflow_client import HTTP_ENV_DEFAULTS
from lora_moe_core.training import state as run_state
from lora_moe_core.training.state import STATE_FILE
from tests.mlflow_server import _free_port, _server_command, _wait_healthy

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
# 8 clips, batch 1, 2 micro-batches per step: 4 steps an epoch, so 6 steps cross an epoch end mid-run
RUN = ("--max_train_steps", "6", "--save_every_n_steps", "1", "--seed", "1", "--num_train_epochs", "20")


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking off (and MLflow not imported) unless a test points MLFLOW_TRACKING_URI at a server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")


def _stage2_argv(cache: str, stage1: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(DEMO / "lora_moe_stage_b_merged.toml"), "--cache", cache,
            "--base_lora_weights", str(stage1), "--output_dir", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(tiny_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", "none")
        argv = ["train", "--config", str(DEMO / "vanilla_lora.toml"), "--cache", tiny_cache, "--output_dir", str(out),
                "--num_train_epochs", "1"]  # fmt: skip
        assert main(argv) == 0
    return out / "lora_final.safetensors"


@pytest.fixture(scope="module")
def reference(tiny_cache: str, stage1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: every killed and resumed run must end exactly here."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", "none")
        assert main(_stage2_argv(tiny_cache, stage1, out, *RUN)) == 0
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Final weights equal bit for bit, and the final state (history, early stopping, epoch sums) equal."""
    expected, actual = _tensors(reference / "lora_moe_final.safetensors"), _tensors(run / "lora_moe_final.safetensors")
    assert expected.keys() == actual.keys()
    unequal = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    final = "training_state_final.json"
    assert json.loads((run / final).read_text()) == json.loads((reference / final).read_text())


def _resumed_step(printed: str) -> int:
    found = re.search(r"resumed from training_state_step_(\d+)\.json", printed)
    assert found, printed
    return int(found[1])


# -- 1. SIGKILL at random steps ---------------------------------------------------------------------------------
def test_sigkill_at_random_steps_then_resume_gives_identical_weights(tiny_cache, stage1, reference, tmp_path, capsys):
    # the step after whose save to kill: 4, 2, 1 (an epoch's last step, mid-epoch, the first), leaving 2+ steps to go
    plan = {seed: random.Random(seed).randint(1, 4) for seed in (0, 1, 2)}
    runs = {seed: tmp_path / f"seed{seed}" for seed in plan}
    processes = {seed: subprocess.Popen([sys.executable, "-m", "lora_moe_core", *_stage2_argv(tiny_cache, stage1,
                                         runs[seed], *RUN)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True) for seed in plan}  # fmt: skip
    try:  # all three at once: their start-up (imports, model building) is most of their time
        waiting, deadline = set(plan), time.monotonic() + 300
        while waiting:
            for seed in list(waiting):
                process = processes[seed]
                if (runs[seed] / f"training_state_step_{plan[seed]}.json").exists() or process.poll() is not None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    waiting.discard(seed)
            assert time.monotonic() < deadline, "no save appeared"
            time.sleep(0.002)
    finally:
        for process in processes.values():
            process.kill()
    report = []
    for seed, kill_step in plan.items():
        process, run = processes[seed], runs[seed]
        assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
        partial = sorted(path.name for path in run.glob(".*"))
        markers = list(run.glob("training_state_step_*.json"))
        assert all(run_state.check_save(marker) is None for marker in markers)  # a marker comes after its files
        capsys.readouterr()
        assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
        printed = capsys.readouterr().out
        resumed = _resumed_step(printed)
        assert "skipping" not in printed and resumed == max(int(STATE_FILE.match(m.name)[1]) for m in markers)
        report.append(f"seed {seed}: killed once the step-{kill_step} save appeared, resumed from step {resumed}; "
                      f"partial files left by the kill: {partial or 'none'}")  # fmt: skip
        assert resumed >= kill_step
        assert not list(run.glob(".*"))  # what the killed save left was removed
        assert (f"removed {len(partial)} partial file" in printed) == bool(partial)
        _assert_same_run(run, reference)
    with capsys.disabled():
        print("\n" + "\n".join(report))


# -- 2. SIGKILL during a checkpoint write -----------------------------------------------------------------------
# Saves exactly as TrainingLoop._save_step does (the recipe's checkpoint, then run_state.save_step), with tensors
# big enough (1 MiB checkpoint, 2 MiB optimizer state) that each file takes about a millisecond to write. Keeps
# the last 3 saves, deleting a save's marker before its files, so the disk use stays bounded.
WRITER = """
import sys
from pathlib import Path
import torch
from lora_moe_core.formats.safetensors_io import write_safetensors
from lora_moe_core.training import state

out = Path(sys.argv[1])
weight = torch.nn.Parameter(torch.zeros(1 << 18))
optimizer = torch.optim.AdamW([weight], lr=0.1)
for step in range(1, 10_000):
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    with torch.no_grad():
        weight.fill_(step)
    checkpoint = out / f"lora_moe_step_{step}.safetensors"
    write_safetensors({"weight": weight}, checkpoint, {"step": str(step)})
    state.save_step(out, step, checkpoint, optimizer, {"step": step, "epoch": 0, "micro_step": step})
    for old in (f"training_state_step_{step - 3}.json", f"lora_moe_step_{step - 3}.safetensors",
                f"optimizer_step_{step - 3}.safetensors"):
        (out / old).unlink(missing_ok=True)
"""
WRITTEN = ("lora_moe_step_", "optimizer_step_", "training_state_step_")  # in the order a save writes them


def _wait_for_partial(out: Path, prefix: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not any(name.startswith(f".{prefix}") and name.endswith(".tmp") for name in os.listdir(out)):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"no partial {prefix}* file seen"
        time.sleep(0.0002)


def _check_frozen_saves(out: Path) -> tuple[int, list[str]]:
    """While the writer is stopped (what a SIGKILL now would leave): every marker names whole files, the latest
    loads with the values of its step, and no visible file is partial. Returns the latest step and partial files."""
    partial = sorted(name for name in os.listdir(out) if name.startswith("."))  # ours, and safetensors' .tmpXXXXXX
    for name in [name for name in partial if "_step_" in name]:  # a save is written in order: no later file yet
        step = int(re.search(r"_step_(\d+)\.", name)[1])
        kind = next(i for i, prefix in enumerate(WRITTEN) if name.startswith(f".{prefix}"))
        for later in WRITTEN[kind:]:
            assert not (out / f"{later}{step}{'.json' if 'state' in later else '.safetensors'}").exists(), name
    markers = sorted(out.glob("training_state_step_*.json"))
    for marker in markers:
        assert run_state.check_save(marker) is None, marker.name
    for path in out.glob("*.safetensors"):
        read_safetensors(path)  # a visible file is never partial
    marker = run_state.find_resume(out, "auto")
    assert marker is not None
    payload = run_state.read_state(marker)
    assert _tensors(out / payload["checkpoint"])["weight"].eq(payload["step"]).all()
    weight = torch.nn.Parameter(torch.zeros(1 << 18))
    optimizer = torch.optim.AdamW([weight])
    run_state.load_optimizer(optimizer, out / payload["optimizer"])
    assert optimizer.state[weight]["step"].item() == payload["step"]
    return payload["step"], partial


def test_sigkill_during_checkpoint_writes_leaves_the_previous_save_intact(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stderr=subprocess.PIPE, text=True)
    rng, mid_write, steps = random.Random(8), 0, []
    try:
        while not (out / "training_state_step_1.json").exists():  # from the first complete save on
            _wait_for_partial(out, WRITTEN[2], writer)
        for _ in range(8):  # stop the writer while a file of a random kind is half-written, check, go on
            _wait_for_partial(out, rng.choice(WRITTEN), writer)
            writer.send_signal(signal.SIGSTOP)
            step, partial = _check_frozen_saves(out)
            mid_write += bool(partial)
            steps.append(step)
            writer.send_signal(signal.SIGCONT)
        while True:  # the kill: SIGKILL while stopped inside a data file's write
            _wait_for_partial(out, rng.choice(WRITTEN[:2]), writer)
            writer.send_signal(signal.SIGSTOP)
            if any(name.startswith(".") for name in os.listdir(out)):
                break
            writer.send_signal(signal.SIGCONT)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
    last, partial = _check_frozen_saves(out)
    print(f"8 stops ({mid_write} mid-write) and a SIGKILL mid-write ({partial}); latest save at each: {steps}, {last}")
    assert mid_write >= 3 and partial and steps == sorted(steps) and last >= steps[-1]
    assert run_state.remove_partial_files(out) == len(partial)
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    assert run_state.find_resume(out, "auto") == out / f"training_state_step_{last}.json"


def test_damaged_saves_are_skipped_for_the_previous_whole_one(tiny_cache, stage1, reference, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for path in reference.glob("*_step_*"):
        if int(re.search(r"_step_(\d+)", path.name)[1]) <= 5:
            shutil.copy(path, run / path.name)
    marker_5 = run / "training_state_step_5.json"
    marker_5.write_text(marker_5.read_text()[:100])  # cut short
    checkpoint_4 = bytearray((run / "lora_moe_step_4.safetensors").read_bytes())
    checkpoint_4[-10] ^= 0x01  # one bit of one weight: same size, still parses, only the checksum notices
    (run / "lora_moe_step_4.safetensors").write_bytes(bytes(checkpoint_4))
    (run / "optimizer_step_3.safetensors").unlink()
    explicit = str(run / "training_state_step_4.json")  # a save named by the user must be whole: no fallback
    err = _one_line_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", explicit))
    assert "lora_moe_step_4.safetensors is damaged (SHA-256 differs" in err
    (run / ".lora_moe_step_6.safetensors.k3j2h1g0.tmp").write_bytes(b"\0" * 100)  # a killed save's leftovers
    (run / ".tmpAb3dE9").write_bytes(b"\0" * 100)
    assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "removed 2 partial file(s)" in printed
    assert "skipping training_state_step_5.json: unreadable marker" in printed
    assert "skipping training_state_step_4.json: lora_moe_step_4.safetensors is damaged" in printed
    assert "skipping training_state_step_3.json: optimizer_step_3.safetensors is missing" in printed
    assert _resumed_step(printed) == 2
    _assert_same_run(run, reference)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- 3. MLflow down at start and mid-run ------------------------------------------------------------------------
class _MlflowServer:
    """``mlflow server`` on a fixed loopback port and sqlite store, so that it can die and come back there."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.uri, self.process = root, port, f"http://127.0.0.1:{port}", None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(_server_command(self.root, self.port, str(self.root / "artifacts")),
                                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                            start_new_session=True)  # fmt: skip
        assert _wait_healthy(self.process, self.uri, 90), (self.root / "server.log").read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL the server and its worker: no goodbye to the clients, the port closes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class _KillServerAt:
    """The run's real tracker; the server is SIGKILLed just before the metrics of ``step`` are logged."""

    def __init__(self, tracker, step: int, server: _MlflowServer):
        self.tracker, self.step, self.server, self.http_env = tracker, step, server, None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and self.http_env is None:
            self.http_env = {key: os.environ.get(key) for key in HTTP_ENV_DEFAULTS}
            self.server.kill()
        self.tracker.log_metrics(metrics, step)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


def _fallback_steps(path: Path) -> list[int]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line["step"] for line in lines if line["kind"] == "metrics" and "step/loss" in line["metrics"]]


def _run_by_name(client, name: str):
    (run,) = client.search_runs([client.get_experiment_by_name("lora-moe").experiment_id],
                                f"attributes.run_name = '{name}'")  # fmt: skip
    return run


def test_mlflow_down_at_start_and_killed_mid_run(tiny_cache, stage1, tmp_path, monkeypatch, caplog, capsys):
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="lora_moe_core.tracking.tracker")
    server = _MlflowServer(tmp_path / "mlflow", _free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        # (a) nothing listens on the port when the run starts
        down = tmp_path / "down_at_start"
        assert main(_stage2_argv(tiny_cache, stage1, down, *RUN[:2], "--num_train_epochs", "20")) == 0
        assert _fallback_steps(down / tracking.FALLBACK_FILE) == [1, 2, 3, 4, 5, 6]
        warnings = [r.getMessage() for r in caplog.records if r.name == "lora_moe_core.tracking.tracker"]
        assert len(warnings) == 2 and "unreachable" in warnings[0] and server.uri in warnings[0]
        assert f"lora-moe sync-tracking {down / tracking.FALLBACK_FILE}" in warnings[1]

        # (b) the server is up when a run starts and is killed before step 3 is logged
        server.start()
        killed = tmp_path / "killed_mid_run"
        real_start, wrapped = tracking.start_tracker, []

        def start_and_wrap(**kwargs) -> _KillServerAt:
            wrapped.append(_KillServerAt(real_start(**kwargs), 3, server))
            return wrapped[-1]

        monkeypatch.setattr(tracking, "start_tracker", start_and_wrap)
        across = real_start("across-the-outage", output_dir=tmp_path / "across")  # lives through the outage
        across.log_metrics({"loss": 0.0}, step=0)
        started = time.monotonic()
        assert main(_stage2_argv(tiny_cache, stage1, killed, *RUN[:2], "--num_train_epochs", "20")) == 0
        with capsys.disabled():
            print(f"\nrun of 6 steps with the server killed before step 3: {time.monotonic() - started:.1f} s")
        assert wrapped[0].http_env == HTTP_ENV_DEFAULTS  # short timeout, 1 retry: no stall for minutes
        assert _fallback_steps(killed / tracking.FALLBACK_FILE) == [3, 4, 5, 6]
        across.log_metrics({"loss": 1.0}, step=1)  # server dead: kept, not sent
        err = _one_line_error(capsys, ["sync-tracking", str(killed / tracking.FALLBACK_FILE)])
        assert "is unreachable" in err and "once it is back" in err

        # the server comes back on the same port and store; the queue and the fallback files are sent
        server.start()
        assert across.flush() and across.unsent == 0
        across.close()
        capsys.readouterr()
        assert main(["sync-tracking", str(down / tracking.FALLBACK_FILE)]) == 0
        assert main(["sync-tracking", str(killed / tracking.FALLBACK_FILE)]) == 0
        assert "sent " in capsys.readouterr().out
        assert main(["sync-tracking", str(killed / tracking.FALLBACK_FILE)]) == 0  # twice: nothing sent twice
        assert "nothing left to send" in capsys.readouterr().out
        assert main(["sync-tracking", str(across.fallback_path)]) == 0  # its tracker replayed it: a "replayed" line
        assert "nothing left to send" in capsys.readouterr().out

        client = MlflowClient(server.uri)
        assert [m.step for m in client.get_metric_history(across.run_id, "loss")] == [0, 1]
        for name in ("stage_b-down_at_start", "stage_b-killed_mid_run"):
            run = _run_by_name(client, name)
            history = client.get_metric_history(run.info.run_id, "step/loss")
            assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6], name  # each step once
            assert run.info.status == "FINISHED" and run.data.params["training.max_train_steps"] == "6"
            assert "checkpoints/lora_moe_final.safetensors" in [
                a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")
            ]
    finally:
        server.kill()


# -- 4. A full disk while caching -------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """For this process, while inside: a write past ``limit`` bytes of a file fails with EFBIG, as on a full disk.

    RLIMIT_FSIZE works unprivileged, with no mount; SIGXFSZ, which would kill the process, is ignored. Only the
    soft limit is lowered, so it can be raised back.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture(scope="module")
def short_and_long_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 clips of 17 frames, then 1 of 33 frames (cut into a 17- and a 33-frame piece)."""
    root = tmp_path_factory.mktemp("disk")
    generate_dataset(root / "short", 2, seed=3, width=64, height=48, num_frames=17)
    generate_dataset(root / "long", 3, seed=4, width=64, height=48, num_frames=33)
    data = root / "data"
    (data / "videos").mkdir(parents=True)
    lines = [json.loads(line) for line in (root / "short" / "manifest.jsonl").read_text().splitlines()]
    lines += [json.loads(line) for line in (root / "long" / "manifest.jsonl").read_text().splitlines()][2:]
    for line in lines:
        source = root / ("short" if line["num_frames"] == 17 else "long") / line["video_path"]
        shutil.copy(source, data / line["video_path"])
    (data / "manifest.jsonl").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return data


def _assert_cache_whole(cache: Path) -> list[str]:
    """Every latent file loads with its text file; every marker names files that exist and load."""
    for path in cache.glob("*_wan.safetensors"):
        read_safetensors(path)
        read_safetensors(cache / f"{LATENT_FILE.match(path.name)['stem']}_wan_te.safetensors")
    markers = sorted(cache.glob("*_lora_moe.json"))
    for marker in markers:
        entry = json.loads(marker.read_text())
        for name in [*entry["latent_files"], entry["text_file"]]:
            read_safetensors(cache / name)
    hidden = [path.name for path in cache.iterdir() if path.name.startswith(".")]
    assert hidden in ([], [".lora-moe-owner"])  # no staging or temp left (the marker: the cache command owns it)
    return [marker.name.removesuffix("_lora_moe.json") for marker in markers]


def test_full_disk_while_caching_is_one_clean_error_and_resumable(short_and_long_videos, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["cache", "--dataset", str(short_and_long_videos), "--task", "tiny", "--output", str(cache),
            "--target_frames", "17", "33", "--resolution", "64", "48"]  # fmt: skip
    with _file_size_limit(12_000):  # a 17-frame latent file (~9.2 kB) fits, a 33-frame one (~16 kB) does not
        err = _one_line_error(capsys, argv)
    assert "file too large" in err and "free space and rerun" in err
    assert "clip_0002_00000-033_0064x0048_wan.safetensors" in err  # the write that failed
    assert _assert_cache_whole(cache) == ["clip_0000", "clip_0001"]
    assert not list(cache.glob("clip_0002_*"))  # its 17-frame piece and text fitted, but none was published
    assert len(read_cache(str(cache))) == 2

    assert main(argv) == 0  # space freed: the rerun keeps the 2 entries and does the rest
    assert "cached 2 clips from 1 videos, 2 up to date, 0 failed" in capsys.readouterr().out
    assert _assert_cache_whole(cache) == ["clip_0000", "clip_0001", "clip_0002"]
    assert len(read_cache(str(cache))) == 4


def test_full_disk_while_saving_a_checkpoint_is_one_clean_error(tiny_cache, stage1, reference, tmp_path, capsys):
    with _file_size_limit((reference / "lora_moe_step_1.safetensors").stat().st_size // 2):
        err = _one_line_error(capsys, _stage2_argv(tiny_cache, stage1, tmp_path, *RUN))
    checkpoint = tmp_path / "lora_moe_step_1.safetensors"
    assert err.startswith(f"error: file too large for the file system or the process's file-size limit while "
                          f"writing {checkpoint}; last complete save: none yet")  # fmt: skip
    assert not list(tmp_path.glob("*step_1*")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded"),
                                             (errno.EFBIG, "file too large")])  # fmt: skip
def test_disk_full_errors_are_recognised_from_either_writer(code, words):
    assert words in disk_full_reason(OSError(code, os.strerror(code)))
    rust = SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    assert words in disk_full_reason(rust)
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied")) is None


def test_a_real_enospc_is_recognised():
    if not os.access("/dev/full", os.W_OK):  # Linux: every write to it fails with ENOSPC
        pytest.skip("no writable /dev/full")
    with pytest.raises(OSError) as raised, open("/dev/full", "wb") as handle:
        handle.write(b"x")
        handle.flush()
    assert disk_full_reason(raised.value) == "no space left on device"
