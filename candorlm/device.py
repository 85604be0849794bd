"""What the machine runs natively, decided once and read by every stage: whether bf16 is native
(and so the training precision), the measured matmul rate (the MFU denominator), the glibc
allocator setting.

It does not decide anything about a model or a run beyond that: training, evaluation and
distributed set-up ask it, and `train.dtype` can still force either precision.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

from candorlm.errors import CandorError

# 0: treat bf16 as absent (the fp32 path, testable and measurable on any machine); 1: as present.
NATIVE_BF16_ENV = "CANDOR_NATIVE_BF16"


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (where there is none: what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: there, bf16 matmuls run ~2.3x fp32 (FIELD_NOTES, 2 Zen4 cores);
    without them bf16 is emulated, ~2 GFLOP/s against ~150 in fp32 (Zen3)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on this device type: CANDOR_NATIVE_BF16 if set, else
    detected (CPU flags; CUDA's bf16 support). Cached: read once per process."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise CandorError(f"{NATIVE_BF16_ENV}={forced!r} must be 0 (treat bf16 as absent) or 1 (as present); "
                              "unset it to detect")
        return forced == "1"
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_bf16()


def autocast_dtype(device: str | torch.device, choice: str = "auto") -> torch.dtype | None:
    """The training precision: torch.bfloat16 (autocast) or None for fp32. `auto` is bf16
    where the device runs it natively, else fp32; "bf16" and "fp32" force either (train.dtype)."""
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(torch.device(device).type) else None


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


@functools.cache
def matmul_flops(device: str = "cpu", dtype: torch.dtype | None = None, n: int = 2048, seconds: float = 0.4) -> float:
    """Measured dense matmul rate (FLOP/s) at size n in `dtype` (None: fp32), the machine's
    practical peak in the precision a run actually uses."""
    a, b, sync = _matmul_operands(device, dtype, n)
    for _ in range(2):
        a @ b
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
        best = max(best, MatmulProbe.flops_at(n) * iters / (time.perf_counter() - t0))
    return best


def _matmul_operands(device: str, dtype: torch.dtype | None, n: int):
    """(a, b, sync): two n x n random matrices in `dtype` (None: fp32) and the device's sync.
    Their own generator: drawing from the global one would change the RNG state a checkpoint
    saves, depending on whether this process had measured before (matmul_flops is cached) or
    when a run's rate samples began."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32, generator=g)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    return a, b, sync


class MatmulProbe:
    """The same n x n matmul as matmul_flops, one at a time, to sample the machine's rate while
    a run trains (train/loop.py measures it every RATE_EVERY_S seconds of steps). On shared
    cores the rate is not a constant: 2048^3 fp32 sampled every ~0.7 s for 15 s ran at 165-302
    GFLOP/s on 2 cores of an Intel Xeon with nothing of ours beside it (docs/benchmarks.md).
    Keeps its operands (3 n x n tensors) until dropped, so a sample costs one matmul."""

    @staticmethod
    def flops_at(n: int = 2048) -> int:
        return 2 * n**3

    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, n: int = 2048):
        self.a, self.b, self.sync = _matmul_operands(device, dtype, n)
        self.out = torch.mm(self.a, self.b)  # the first call also warms the kernel up
        self.flops = self.flops_at(n)

    def __call__(self) -> tuple[float, float]:
        """(FLOP/s, seconds) of one matmul now."""
        self.sync()
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        self.sync()
        dt = time.perf_counter() - t0
        return self.flops / dt, dt


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
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    if os.environ.get("LD_PRELOAD") or any(k in os.environ for k in chosen):
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
