"""One writer per destination: a lease file that says who writes it, renewed while it does.

The file is created exclusively (O_EXCL), so of two runs starting together one
gets it. Its owner renews `heartbeat` every HEARTBEAT seconds; another run
takes a lease over when its owner is gone: a dead process on this host at
once, any other owner once its heartbeat is `timeout` seconds old (a machine
that died). So a second run is refused, naming the first, and a run after a
kill -9 resumes without anyone cleaning up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from storage.errors import PtqflowError

HEARTBEAT = 10.0
TIMEOUT = float(os.environ.get("PTQFLOW_LEASE_TIMEOUT", 60))


class Lease:
    """The lease at `path` on `what` (a destination URL), held from `acquire` to `release`."""

    def __init__(self, path: Path, what: str, timeout: float = TIMEOUT):
        self.path, self.what, self.timeout = Path(path), what, timeout
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> dict | None:
        """The live holder's record, or None when the lease is free or its holder is gone."""
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            held = {}  # half-written by a run killed while writing it
        if held.get("owner") == self.record["owner"] or self._gone(held):
            return None
        return held

    def check(self) -> None:
        """Refuse, naming the holder, when another run holds the lease."""
        held = self.holder()
        if held is not None:
            since = time.strftime("%H:%M:%S", time.localtime(held.get("since", 0)))
            raise PtqflowError(
                f"{self.what} is being written by another ptqflow run (pid {held.get('pid')} on "
                f"{held.get('host')}, since {since}); wait for it to end or stop it. A run "
                f"that died is taken over {self.timeout:.0f} s after its last heartbeat."
            )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.record["since"] = time.time()
        for _ in range(3):
            self.check()
            self.path.unlink(missing_ok=True)  # free or gone: take it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another run took it first: check again
            with os.fdopen(fd, "w") as f:
                json.dump({**self.record, "heartbeat": time.time()}, f)
            self._thread = threading.Thread(target=self._renew, daemon=True, name="ptqflow-lease")
            self._thread.start()
            return
        self.check()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if json.loads(self.path.read_text()).get("owner") == self.record["owner"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            tmp = self.path.with_name(f".{self.path.name}.{self.record['owner']}")
            tmp.write_text(json.dumps({**self.record, "heartbeat": time.time()}))
            os.replace(tmp, self.path)

    def _gone(self, held: dict) -> bool:
        if held.get("host") == self.record["host"] and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - float(held.get("heartbeat", 0)) > self.timeout
