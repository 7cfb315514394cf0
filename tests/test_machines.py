"""Several machines: a Dask scheduler and two workers from their CLIs, each worker and the
CLI on a "machine" of its own, against one Prefect server and an S3 server on loopback.

A machine is a private mount namespace (`unshare --mount`) in which one path, where
HOME, PREFECT_HOME (so the staging and download folders) and the working directory
lie, is bound to a folder of its own: the same absolute paths, another disk. So a
task that reads a file another task wrote on another machine finds nothing, as on
real machines. SOURCE, DEST and --result-storage are on the S3 server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.server import free_port, server_process
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import CLI, IGNORE, ROOT, files, quantize_folder, remote_files, upload_folder

pytestmark = pytest.mark.slow  # Prefect server, Dask cluster, subprocesses

SCHEME = "W4A16"
# on its machine: bind the machine's disk over the shared path, then run the command there
ON_MACHINE = 'mount --bind "$1" "$2" && cd "$2/work" && shift 2 && exec "$@"'


class Machines:
    """Machines by name, each with its own disk bound over the same path `at`."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.at, self.root = root / "machine", root / "disks"
        self.at.mkdir()
        self.env = {
            **env,
            "HOME": str(self.at / "home"),
            "PREFECT_HOME": str(self.at / "prefect"),
            "PYTHONPATH": str(ROOT),
        }

    def disk(self, name: str) -> Path:
        disk = self.root / name
        for sub in ("home", "prefect", "work"):
            (disk / sub).mkdir(parents=True, exist_ok=True)
        return disk

    def argv(self, name: str, argv: list[str]) -> list[str]:
        disk = self.disk(name)
        mount = ["unshare", "--mount", "--propagation", "private"]
        return [*mount, "sh", "-c", ON_MACHINE, "sh", str(disk), str(self.at), *argv]

    def start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(name, argv),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def claims(self, name: str) -> list[str]:
        """The shards written on machine `name`: each records its key beside it."""
        staging = self.root / name / "prefect" / "ptqflow" / "staging"
        return sorted(p.name.removesuffix(".key") for p in staging.rglob("shards/*.key"))


def namespaces_unavailable(tmp_path: Path) -> str | None:
    """Why private mount namespaces cannot be made here, or None."""
    source, target = tmp_path / "probe-disk", tmp_path / "probe-at"
    source.mkdir()
    target.mkdir()
    (source / "seen").touch()
    probe = f'mount --bind "{source}" "{target}" && test -e "{target}/seen"'
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", probe],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return "no unshare command"
    if proc.returncode:
        return f"unshare --mount and mount --bind failed: {proc.stderr.strip()}"
    if (target / "seen").exists():
        return "a bind mount made in a private namespace showed outside it"
    return None


@pytest.fixture
def machines(tmp_path, s3) -> Iterator[Machines]:
    """Machines sharing one Prefect server and the S3 server (its settings in the env)."""
    why = namespaces_unavailable(tmp_path)
    if why:
        pytest.skip(f"no private mount namespaces: {why}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    with server_process() as url:
        yield Machines(tmp_path, {**env, "PREFECT_API_URL": url})


@contextmanager
def cluster(machines: Machines, logs: Path, pin: str = "") -> Iterator[tuple[str, dict]]:
    """`dask scheduler` (with tests/dask_pin.py and `pin`) and a `dask worker` named a on
    machine a, another named b on machine b; yields the scheduler's address and the
    workers' processes. Everything it started is killed on leaving."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            address.rsplit(":", 1)[1],
            "--no-dashboard",
            "--preload",
            str(ROOT / "tests" / "dask_pin.py"),
        ],
        env={**machines.env, "PTQFLOW_PIN": pin},
        stdout=open(logs / "scheduler.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1"]
    worker += ["--nthreads", "2", "--no-dashboard"]
    workers = {
        name: machines.start(name, [*worker, "--name", name], logs / f"worker-{name}.log")
        for name in ("a", "b")
    }
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for proc in [*workers.values(), scheduler]:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def quantize_command(dest: str, address: str) -> list[str]:
    """The command the README gives for several machines, as the test runs it."""
    ignore = [arg for name in IGNORE for arg in ("--ignore", name)]
    return [
        *CLI,
        "quantize",
        "s3://models/src",
        f"s3://models/{dest}",
        "--scheme",
        SCHEME,
        *ignore,
        "--task-runner",
        "dask",
        "--dask-address",
        address,
        "--max-workers",
        "2",
        "--device",
        "cpu",
        "--result-storage",
        f"s3://models/results-{dest}",
    ]


def run_cli(machines: Machines, command: list[str], log: Path) -> int:
    """The command on machine cli, to its end; its output goes to `log`."""
    proc = machines.start("cli", command, log)
    return proc.wait(timeout=600)


def ran_where(address: str) -> list[tuple[str, str]]:
    """(task prefix, worker name) of every task the scheduler saw finish."""
    from distributed import Client

    from tests.dask_pin import NAME

    with Client(address, timeout=60) as client:
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[NAME].ran)


def busy(client, name: str) -> bool:
    """Is the worker named `name` running a task?"""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return any(keys and workers[w]["name"] == name for w, keys in client.processing().items())


@pytest.fixture
def checkpoint(tmp_path, s3) -> dict[str, bytes]:
    """A 6-shard Qwen3-MoE checkpoint on S3 (fused sets split across shards), and what a
    local run makes of it."""
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=6)
    upload_folder(src, "s3://models/src")
    quantize_folder(src, tmp_path / "want", resolve_config(SCHEME, ignore=IGNORE))
    return files(tmp_path / "want")


def log_tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def test_quantize_on_two_machines(tmp_path, s3, machines, checkpoint):
    """A plain run, a run that loses a worker's machine, and a run where every task but
    the quantize tasks is pinned to the other worker: each ends identical to a local run."""
    from distributed import Client

    logs = tmp_path / "logs"
    logs.mkdir()

    # a plain run
    with cluster(machines, logs) as (address, _):
        log = logs / "plain.log"
        assert run_cli(machines, quantize_command("plain", address), log) == 0, log_tail(log)
    assert remote_files("s3://models/plain") == checkpoint
    assert machines.claims("cli") == []  # the CLI's machine writes no shard

    # worker a's machine is lost (kill -9) once a shard is in DEST and a is running a task
    with cluster(machines, logs) as (address, workers):
        log = logs / "killed.log"
        command = quantize_command("killed", address)
        proc = machines.start("cli", command, log)
        with Client(address, timeout=60) as client:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                s3.invalidate_cache()
                landed = [p for p in s3.find("models/killed") if p.endswith(".safetensors")]
                if landed and busy(client, "a"):
                    break
                time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a worker could be killed"
        os.killpg(workers["a"].pid, signal.SIGKILL)
        first = proc.wait(timeout=600)
        if first != 0:  # the same command again, once
            assert run_cli(machines, command, log) == 0, log_tail(log)
    assert remote_files("s3://models/killed") == checkpoint, log_tail(log)

    # every task but quantize on worker b: a shard is quantized on a, everything else on b
    with cluster(machines, logs, pin="quantize_task=a,*=b") as (address, _):
        log = logs / "pinned.log"
        code = run_cli(machines, quantize_command("pinned", address), log)
        ran = ran_where(address)
        assert code == 0, log_tail(log)
    assert {stage for stage, _ in ran} >= {"download_task", "quantize_task"}, ran
    assert all((worker == "a") == (stage == "quantize_task") for stage, worker in ran), ran
    assert remote_files("s3://models/pinned") == checkpoint
