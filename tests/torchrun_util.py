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


def leave_distributed(exit_code: int = 0) -> None:
    """End a torchrun worker: wait for every rank, destroy the process group, and exit without interpreter teardown.

    Why ``os._exit``: gloo runs each collective on a worker thread (``ProcessGroupGloo::runLoop``), and that thread
    also destroys the finished work object, e.g. the final barrier's ``AsyncBarrierWork`` together with the earlier
    ``AsyncAllgatherWork`` it keeps alive. Freeing those tensors drops Python references, so the thread takes the GIL.
    If the main thread has meanwhile reached ``Py_FinalizeEx``, CPython ends any other thread that takes the GIL
    with ``pthread_exit``, whose forced unwind crosses the noexcept C++ destructor: ``std::terminate``, "terminate
    called without an active exception", SIGABRT in a rank whose work had all finished (about 1 run in 15 here;
    core dump backtrace: runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    PyThread_exit_thread -> abort). The DDP reducer keeps the process group alive past ``destroy_process_group``, so
    its threads are not joined before finalisation. Skipping finalisation removes the race; every result has been
    written and flushed by then.
    """
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
