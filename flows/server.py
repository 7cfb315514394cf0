"""One Prefect server for a CLI run, which dies with the run.

Prefect's temporary server outlives a `kill -9` of its parent. When no
PREFECT_API_URL is set, the CLI starts `prefect server start` itself with
PR_SET_PDEATHSIG, so the kernel kills the server when the CLI dies, however
it dies; every task of the run talks to this one server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _flush_logs() -> None:
    """Send logs still queued for the API while the server is up."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


@contextlib.contextmanager
def prefect_server(timeout: float = 120.0) -> Iterator[str]:
    """Use PREFECT_API_URL if set; else run a server on 127.0.0.1 for the duration."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--no-services"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not healthy(url):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server on port {port} not healthy in {timeout} s")
            time.sleep(0.3)
        with temporary_settings({PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url  # for subprocesses the run starts
            try:
                yield url
            finally:
                _flush_logs()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
