"""Hostile conditions, round 3: SIGTERM during training, Ctrl-C during caching, bad environment variables and
lying single-file weights.

What Kubernetes and torchrun users expect of a restartable trainer (SIGTERM: finish the step, save, exit 143,
resume to the same weights) and of a cache writer (Ctrl-C: no half entry, exit 130, the rerun completes), checked
through the real CLI in subprocesses with real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_moe_core.cli.main import main
from lora_moe_core.signals import GracefulStop
from lora_moe_core.training import state as run_state
from tests.test_faults_training import RUN, _assert_same_run, _resumed_step, _stage2_argv, reference, stage1

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
