"""Launch a 2-rank gloo job with ``torchrun`` from a test."""

from __future__ import annotations

import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_clash(r: subprocess.CompletedProcess) -> bool:
    text = (r.stdout + r.stderr).lower()
    return "eaddrinuse" in text or "address already in use" in text


def run_torchrun(
    script_args: list[str], env: dict, nproc: int = 2, attempts: int = 3, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on a free local port. The port is probed, then released for torchrun to
    bind, so another process can take it in between: only that failure is retried, on a new port."""
    for _ in range(attempts):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nproc),
                "--master_port",
                str(free_port()),
                *script_args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode == 0 or not _port_clash(r):
            return r
    return r
