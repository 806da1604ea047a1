"""Host memory of the 24 GiB mode at A14B: per-tensor pinned copies (as before) vs the host arena (now).

    python bench/host_memory.py --json bench/results_host_memory_h100.json   # two A14B DiTs, one GPU
    python bench/host_memory.py --smoke                                      # tiny model on CPU (CI)

Each arm runs in its own process (peak RSS is per process): two A14B DiTs built in bf16 on the GPU with random
weights, then ``DiTPlacement`` with ``offload_inactive_dit``, ``fp8_base`` and ``blocks_to_swap 20``, exactly as the
trainer's low-memory mode builds it. ``per_tensor`` gives every host copy its own pinned allocation
(``host_slab_bytes=0``: torch's pinned allocator rounds each one up to a power of two); ``arena`` packs them into
slabs (the default). Reported: the bytes of the host copies, the host bytes reserved for them, RSS after the
placement, peak RSS, and the placement's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_dit  # noqa: E402

from lora_moe_core.model.host_arena import SLAB_BYTES  # noqa: E402
from lora_moe_core.model.memory import DiTPlacement  # noqa: E402

ARMS = {"per_tensor": 0, "arena": SLAB_BYTES}  # arm: host_slab_bytes
GIB = 2**30


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_arm(arm: str, smoke: bool, blocks_to_swap: int) -> dict:
    """One placement in this process; returns its figures."""
    task, device = ("tiny", torch.device("cpu")) if smoke else ("t2v-A14B", torch.device("cuda"))
    dits = {"high": build_dit(task, device, torch.bfloat16), "low": build_dit(task, device, torch.bfloat16)}
    before = _status_gib("VmRSS")
    started = time.perf_counter()
    placement = DiTPlacement(dits, device, offload_inactive_dit=True, fp8_base=True, blocks_to_swap=blocks_to_swap,
                             host_slab_bytes=ARMS[arm])  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    host = [p for dit in dits.values() for p in dit.parameters() if p.device.type == "cpu"]
    copied = sum(p.numel() * p.element_size() for p in host)
    reserved = placement.host.reserved_bytes
    return {"arm": arm, "task": task, "blocks_to_swap": blocks_to_swap, "host_tensors": len(host),
            "host_copies_bytes": copied, "arena_reserved_bytes": reserved,
            "host_copies_gib": round(copied / GIB, 3), "arena_reserved_gib": round(reserved / GIB, 3),
            "rss_before_gib": round(before, 3), "rss_after_gib": round(_status_gib("VmRSS"), 3),
            "peak_rss_gib": round(_status_gib("VmHWM"), 3), "placement_s": round(seconds, 2),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--blocks_to_swap", type=int, default=20)
    parser.add_argument("--arm", choices=sorted(ARMS), help="run one arm in this process (the driver's worker)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    swap = min(args.blocks_to_swap, 2) if args.smoke else args.blocks_to_swap
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.smoke, swap)))
        return 0
    results = []
    for arm in ARMS:
        command = [sys.executable, __file__, "--arm", arm, "--blocks_to_swap", str(swap)] + (["--smoke"] * args.smoke)
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    saved = results[0]["rss_after_gib"] - results[1]["rss_after_gib"]
    print(f"arena saves {saved:.2f} GiB of host RSS after the placement "
          f"({results[0]['rss_after_gib']:.2f} -> {results[1]['rss_after_gib']:.2f} GiB)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "arms": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
