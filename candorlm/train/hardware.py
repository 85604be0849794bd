"""What the machine can do: its bf16 support and its measured matmul rate (the MFU denominator)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: there, bf16 matmuls run ~2.3x fp32 (FIELD_NOTES, 2 Zen4 cores)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: str, choice: str) -> torch.dtype | None:
    """None means fp32. `auto` is bf16 on CUDA and on CPUs with native bf16."""
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


@functools.cache
def matmul_flops(device: str = "cpu", dtype: torch.dtype | None = torch.bfloat16, n: int = 2048, seconds: float = 0.4) -> float:
    """Measured dense matmul rate (FLOP/s) at size n: the machine's practical peak."""
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    best = 0.0
    # The best of 3 rounds: the peak is what the machine can do, and a neighbour only slows
    # a round down (single rounds varied 796-872 GFLOP/s on one machine).
    for _ in range(3):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3 or iters < 2:
            a @ b
            iters += 1
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best
