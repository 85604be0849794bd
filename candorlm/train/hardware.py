"""What the machine can do: its bf16 support and its measured matmul rate (the MFU denominator)."""

from __future__ import annotations

import functools
import os
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
    # Its own generator: drawing from the global one would change the RNG state a checkpoint
    # saves, depending on whether this process had measured before (it is cached).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
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


_ALLOCATOR_DONE = False


def configure_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    glibc serves large blocks (>= 128 KB, rising to 32 MB) with fresh `mmap`s and unmaps them
    on free, so every step's big activations (an 8k x 8k bf16 logits block is 128 MB) arrive
    as untouched pages and each first touch is a page fault. Measured on 2 cores: the head's
    8192 x 256 x 8192 bf16 matmul ran at 447 GFLOP/s that way and at 888 GFLOP/s with the heap
    kept; an fp32 softmax over 8M elements took 12.9 ms instead of 2.1 ms. PyTorch has no
    caching allocator on CPU, so this is what jemalloc/tcmalloc preloads are usually for.

    Process-wide and idempotent; a no-op off glibc, and when the user already chose (glibc's
    MALLOC_*_ env vars or an LD_PRELOADed allocator). The cost: the process keeps its peak
    heap until it exits. Returns whether the settings were applied."""
    global _ALLOCATOR_DONE
    if _ALLOCATOR_DONE:
        return True
    if os.environ.get("LD_PRELOAD") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # Blocks below 1 GiB come from the heap (accepted by glibc 2.36 here); a build that refuses
    # it gets 32 MB, the largest dynamic threshold glibc picks by itself on 64-bit.
    threshold = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 or mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = threshold and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _ALLOCATOR_DONE = ok
    return ok
