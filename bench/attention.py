"""Attention kernels at the A14B self-attention shape (40 heads × 128, 32,760 tokens, bf16), forward and backward.

    python bench/attention.py --json attention.json     # on the GPU
    python bench/attention.py --smoke                   # tiny shape on CPU (SDPA's math kernel): CI

Each backend is one of the trainer's ``attention_backend`` values, run through PyTorch's SDPA with that kernel
forced. Forward-only candidates for the blocks before the first adapter are timed when their package is there:
"fa3" and "fa3_fp8" (``frozen_attention``: FlashAttention-3's forward from ``fa3-fwd``, bf16 or per-head-scaled
fp8 q/k/v, the quantisation included) and "sage" (int8 QK, SageAttention 1's Triton kernels).
Prints ms (median of CUDA-event-timed repeats), TFLOP/s and the relative error of the output against the math
kernel in fp32 on a slice of the heads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = {"sdpa": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def _attention(name: str):
    if name in ("fa3", "fa3_fp8"):  # [B, S, H, D] layout
        from lora_moe_core.model.frozen_attention import KERNELS as FORWARD_ONLY

        return lambda q, k, v: FORWARD_ONLY[name](*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    if name == "sage":
        from sageattention import sageattn

        return lambda q, k, v: sageattn(q, k.clone(), v, tensor_layout="HND")  # it subtracts k's mean in place
    kernel = KERNELS[name]

    def run(q, k, v):
        if kernel is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _time_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    if not torch.cuda.is_available():
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(name: str, q, k, v, reference, repeats: int) -> dict:
    attention = _attention(name)
    out = attention(q, k, v)
    heads = reference.shape[1]
    error = ((out[:, :heads].float() - reference).norm() / reference.norm()).item()
    forward = _time_ms(lambda: attention(q, k, v), repeats)
    result = {"forward_ms": forward, "rel_error": error}
    if name in KERNELS:
        grads = [t.detach().requires_grad_(True) for t in (q, k, v)]
        grad_out = torch.randn_like(q)

        def both():
            attention(*grads).backward(grad_out)

        result["forward_backward_ms"] = _time_ms(both, repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", default="sdpa,flash,cudnn,efficient,sage,fa3,fa3_fp8")
    parser.add_argument("--json")
    args = parser.parse_args()
    device, dtype, heads, dim = torch.device("cuda"), torch.bfloat16, 40, 128
    if args.smoke:
        device, dtype, heads, args.tokens, args.repeats, args.backends = "cpu", torch.float32, 2, 64, 2, "sdpa"
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, args.tokens, dim, generator=generator).to(device, dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):  # fp32 reference on 4 heads (the full one needs 4 GiB per score matrix)
        reference = F.scaled_dot_product_attention(*(t[:, :4].float() for t in (q, k, v)))
    flops = 4 * args.tokens * args.tokens * dim * heads
    results = {}
    for name in args.backends.split(","):
        try:
            results[name] = bench(name, q, k, v, reference, args.repeats)
        except (ImportError, RuntimeError) as exc:
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"{name:10s} unavailable: {results[name]['error']}")
            continue
        r = results[name]
        line = f"{name:10s} fwd {r['forward_ms']:8.2f} ms {flops / r['forward_ms'] / 1e9:6.0f} TFLOP/s"
        if "forward_backward_ms" in r:
            line += f"  fwd+bwd {r['forward_backward_ms']:8.2f} ms {3.5 * flops / r['forward_backward_ms'] / 1e9:6.0f}"
        print(f"{line}  rel err {r['rel_error']:.2e}", flush=True)
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.tokens} tokens × {heads} heads × {dim}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "tokens": args.tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
