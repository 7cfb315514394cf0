"""One Prefect server for a CLI run, which dies with the run.

Prefect's temporary server outlives a `kill -9` of its parent. When no
PREFECT_API_URL is set, the CLI starts `prefect server start` itself with
PR_SET_PDEATHSIG, so the kernel kills the server when the CLI dies, however
it dies; every task of the run talks to this one server.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out its traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_tracebacks() -> None:
    """Prefect's terminal output without tracebacks: the run's logs (the UI) keep them, and
    the CLI ends with one message. PTQFLOW_DEBUG=1 (ptqflow --debug) shows them."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if os.environ.get("PTQFLOW_DEBUG") == "1":
        return
    named = logging.Logger.manager.loggerDict.values()
    for logger in [logging.getLogger(), *(n for n in named if isinstance(n, logging.Logger))]:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                if not isinstance(handler.formatter, _WithoutTraceback):
                    handler.setFormatter(_WithoutTraceback(handler.formatter))


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
def background(
    argv: list[str],
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `argv` until the block ends, once `ready()`; it dies with this process (Linux).

    It runs in its own session, so the SIGINT a terminal sends its foreground
    process group on Ctrl-C reaches only this process, which ends the run while
    the server still records it.

    Its output goes to a temporary file, never a pipe: nobody reads the pipe while
    it runs, and a full one (64 KiB) would block it. If it exits before it is
    ready, the error shows the end of that output.
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=err,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            start_new_session=True,  # a terminal's Ctrl-C stops the run, which then stops it
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(err)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} not ready in {timeout} s:\n{_tail(err)}")
                time.sleep(0.3)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(f, size: int = 2000) -> str:
    """The last `size` bytes written to the file `f`, as text."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - size))
    return f.read().decode(errors="replace")


PORT_TRIES = 3
PORT_TAKEN = "already in use"  # prefect's own check, or uvicorn's bind


@contextlib.contextmanager
def server_process(timeout: float = 120.0) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 for the duration; yields its API URL.
    Imports no Prefect, so a benchmark's parent process stays small.

    The port is free when chosen, but the server binds it seconds later: a connection
    another process opens meanwhile may take it as its local port. The server then
    exits at once, and another port is tried (PORT_TRIES in all)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "0"}
    for tries_left in reversed(range(PORT_TRIES)):
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        options = f"--host 127.0.0.1 --port {port} --no-services".split()
        argv = [sys.executable, "-m", "prefect", "server", "start", *options]
        what = f"prefect server on port {port}"
        ready = functools.partial(healthy, url)
        started = False
        try:
            with background(argv, ready, timeout=timeout, what=what, env=env):
                started = True
                yield url
            return
        except RuntimeError as e:
            if started or not tries_left or PORT_TAKEN not in str(e).lower():
                raise


@contextlib.contextmanager
def prefect_server(timeout: float = 120.0) -> Iterator[str]:
    """Use PREFECT_API_URL if set; else run a server on 127.0.0.1 for the duration."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    quiet_tracebacks()
    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    with server_process(timeout) as url:
        with temporary_settings({PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url  # for subprocesses the run starts
            try:
                yield url
            finally:
                _flush_logs()
                os.environ.pop("PREFECT_API_URL", None)
