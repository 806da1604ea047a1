"""System metrics of a training run (CPU, host memory, GPU memory/utilisation/power) under MLflow's names.

MLflow's own ``SystemMetricsMonitor`` logs from a thread through a separate client and stops for good at the
first failed request, so an MLflow outage would end it. Here a daemon thread only *samples* (psutil, torch.cuda,
NVML when ``nvidia-ml-py`` is installed: the trainer image has it); the training loop's own ``log_metrics``
calls carry the averages, at most every ``interval_s``, through the tracker: same queue, same fallback file,
same replay. Names are MLflow's (``system/cpu_utilization_percentage``, ``system/gpu_0_memory_usage_megabytes``
…), so the run page's *System metrics* tab plots them.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

PREFIX = "system/"


def _nvml() -> Any:
    """The NVML module, initialised, or None (not installed, no driver: CPU machines)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...: no GPU metrics from NVML
        return None


def sample() -> dict[str, float]:
    """One reading of every available system metric (without the ``system/`` prefix)."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    values = {"cpu_utilization_percentage": psutil.cpu_percent(),
              "system_memory_usage_megabytes": memory.used / 1e6,
              "system_memory_usage_percentage": memory.used / memory.total * 100,
              "process_memory_rss_megabytes": psutil.Process().memory_info().rss / 1e6}  # fmt: skip
    if torch.cuda.is_available():  # what this process holds, as the PyTorch allocator sees it
        for index in range(torch.cuda.device_count()):
            values[f"gpu_{index}_torch_allocated_megabytes"] = torch.cuda.memory_allocated(index) / 1e6
            values[f"gpu_{index}_torch_reserved_megabytes"] = torch.cuda.memory_reserved(index) / 1e6
    nvml = _nvml()
    if nvml is not None:  # the whole device, as nvidia-smi sees it
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            values[f"gpu_{index}_memory_usage_megabytes"] = info.used / 1e6
            values[f"gpu_{index}_memory_usage_percentage"] = info.used / info.total * 100
            values[f"gpu_{index}_utilization_percentage"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            values[f"gpu_{index}_power_usage_watts"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
    return values


class SystemMetricsTracker:
    """Wraps a tracker: samples system metrics every ``sample_s`` in a daemon thread and adds their means to the
    run's ``log_metrics`` calls at most every ``interval_s``. Every other call goes to the wrapped tracker."""

    def __init__(self, tracker: Any, interval_s: float = 30.0, sample_s: float = 5.0):
        self.tracker, self.interval_s, self.sample_s = tracker, interval_s, sample_s
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # monotonic time of the last system metrics logged; None: never, so the first step carries them whatever
        # the clock reads (time.monotonic() counts from boot: a node up for less than interval_s reads below it)
        self._last_logged: float | None = None
        self._collect()
        self._thread = threading.Thread(target=self._run, name="lora-moe-system-metrics", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # log_params, log_artifact, log_dataset, set_tags, run_id, ...
        return getattr(self.tracker, name)

    def _collect(self) -> None:
        try:
            reading = sample()
        except Exception:  # noqa: BLE001 - a failed reading costs one sample, never the run
            return
        with self._lock:
            for key, value in reading.items():
                self._samples[key].append(float(value))

    def _run(self) -> None:
        while not self._stop.wait(self.sample_s):
            self._collect()

    def take(self) -> dict[str, float]:
        """Means of the samples since the last call, with MLflow's ``system/`` prefix."""
        with self._lock:
            means = {PREFIX + key: sum(values) / len(values) for key, values in self._samples.items() if values}
            self._samples.clear()
        return means

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """The training metrics, plus the system metrics when ``interval_s`` has passed since they were last sent."""
        now = time.monotonic()
        if self._last_logged is None or now - self._last_logged >= self.interval_s:
            self._last_logged = now
            metrics = {**metrics, **self.take()}
        self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        """Stop sampling and close the wrapped run."""
        self._stop.set()
        self.tracker.close(status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")
