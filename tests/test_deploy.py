"""The README's server walkthrough, command by command, against a real `prefect server start`.

A module fixture starts `prefect server start` on 127.0.0.1 (SQLite in a temporary
PREFECT_HOME); every command runs as a user would type it, in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.server import free_port, healthy
from storage.safetensors import read_file_header
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import ROOT, files, quantize_folder

IGNORE = ["lm_head", "model.embed_tokens"]
STOP_S = 30  # a worker stops in about 1 s, even on 2 busy cores
FLUSH_S = 15  # an unanswered events websocket closes in about 11 s


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@contextmanager
def prefect_server_process(home: Path):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(ROOT),
        PWD=str(ROOT),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: healthy(env["PREFECT_API_URL"]), 120, "prefect server")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server_process(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


def command_line(command: str) -> list[str]:
    """A walkthrough command (`prefect ...` / `ptqflow ...`) as run from this environment."""
    argv = shlex.split(command)
    if argv[0] == "prefect":
        return [sys.executable, "-m", "prefect", *argv[1:]]
    if argv[0] == "ptqflow":
        return [sys.executable, "-m", "flows.cli", *argv[1:]]
    return argv


def attempt(command: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a walkthrough command from the repository root, whatever its exit status."""
    return subprocess.run(
        command_line(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def sh(command: str, env: dict, timeout: float = 300) -> str:
    """Run a walkthrough command from the repository root; it must succeed."""
    proc = attempt(command, env, timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def start(command: str, env: dict, log: Path) -> subprocess.Popen:
    """Start a long-running walkthrough command (a worker, `ptqflow serve`); its output goes
    to `log`, which `stop` reads."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command_line(command),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def worker_stopped(proc: subprocess.Popen) -> bool:
    """Whether `prefect worker start` printed "Worker '...' stopped!": its shutdown is over
    (loops cancelled, flow runs' processes handled). What a worker still does after that is
    Prefect's exit-time flush (threading._shutdown -> _QueueServiceBase._at_exit -> drain,
    no deadline) of the events it still holds (prefect.worker.stopped): when the server has
    not answered for a while, its events websocket was closed by the keepalive, and the flush
    retries the connection 11 times with a 10 s opening timeout each (about 2 minutes)."""
    return b"' stopped!" in proc.log.read_bytes()


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a walkthrough command as a user would (SIGTERM to its process group), and wait
    for it to exit. A worker that has printed "stopped!" but is still flushing its last
    events to a server that does not answer (see `worker_stopped`) gets FLUSH_S, then is
    killed without a word: only a `prefect.worker.stopped` event is lost. One that has not
    stopped within STOP_S is named in a warning and killed as a lost machine."""
    import psutil

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    started, stopped = time.monotonic(), None
    while proc.poll() is None:
        now = time.monotonic()
        if stopped is None and worker_stopped(proc):
            stopped = now
        if stopped is not None and now - stopped > FLUSH_S:
            kill_tree(proc)
        elif stopped is None and now - started > STOP_S:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            running = [" ".join(p.cmdline()[:6]) for p in family if p.is_running()]
            warnings.warn(f"still running {STOP_S} s after {sig!r}: {running}", stacklevel=2)
            kill_tree(proc)
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 a process and everything it started (the worker starts flow runs in
    sessions of their own): what losing the worker's machine does."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # it exited meanwhile
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def deployed(server):
    sh("prefect work-pool create ptqflow --type process", server)
    sh("prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml", server)
    return server


def reference(src: Path, out: Path, scheme: str) -> dict[str, bytes]:
    quantize_folder(src, out, resolve_config(scheme, ignore=IGNORE))
    return files(out)


def params(src, dst, scheme) -> str:
    ignore = '["lm_head", "model.embed_tokens"]'
    return f"-p source={src} -p destination={dst} -p scheme={scheme} -p 'ignore={ignore}'"


@pytest.mark.slow
def test_worker_runs_the_quantize_deployment(tmp_path, deployed):
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    worker = start("prefect worker start --pool ptqflow", deployed, tmp_path / "worker.log")
    try:
        out = sh(
            f"prefect deployment run quantize-checkpoint/quantize "
            f"{params(src, tmp_path / 'out', 'FP8_BLOCK')} --watch",
            deployed,
        )
        assert "Completed" in out
    finally:
        stop(worker)
    assert files(tmp_path / "out") == reference(src, tmp_path / "want", "FP8_BLOCK")


def flow_run_id(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(output)


@pytest.mark.slow
def test_killed_worker_then_flow_run_retry_reuses_finished_shards(tmp_path, deployed):
    from benchmarks.make_checkpoint import make_checkpoint

    src = make_checkpoint(tmp_path / "src", size_gb=0.3, shard_gb=0.025, hidden=1024)
    out = tmp_path / "out"
    worker = start("prefect worker start --pool ptqflow", deployed, tmp_path / "lost.log")
    run = sh(
        f"prefect deployment run quantize-checkpoint/quantize {params(src, out, 'NVFP4A16')}",
        deployed,
    )
    run_id = flow_run_id(run)
    records = out / ".ptqflow" / "results"
    wait_until(lambda: records.exists() and len(list(records.iterdir())) >= 2, 300, "2 shards")
    kill_tree(worker)  # the worker and the flow run process it started
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    # A self-hosted server marks such a zombie run Crashed with its zombie-detection
    # automation; do what it does, then retry from the CLI as a user would.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Crashed(message="worker killed"), force=True)
    sh(f"prefect flow-run retry {run_id}", deployed)
    worker = start("prefect worker start --pool ptqflow", deployed, tmp_path / "worker.log")
    try:
        with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                wait_until(lambda: client.read_flow_run(run_id).state.is_final(), 300, "retry")
                state = client.read_flow_run(run_id).state
                assert state.is_completed(), state
                runs = [t for t in client.read_task_runs() if str(t.flow_run_id) == run_id]
                cached = [t for t in runs if t.state_name == "Cached"]
    finally:
        stop(worker)
    assert len(cached) >= len([n for n in done if (out / n).exists()]) - 1
    unchanged = [n for n, mtime in done.items() if (out / n).stat().st_mtime_ns == mtime]
    assert len(unchanged) >= len(done) - 1  # at most the shard in flight was redone
    want = {k: v for k, v in reference(src, tmp_path / "want", "NVFP4A16").items()}
    assert files(out) == want


@pytest.mark.slow
def test_ptqflow_on_an_existing_server_and_dask_cluster(tmp_path, server):
    """`ptqflow quantize ... --task-runner dask --dask-address tcp://...` against one server."""
    port = free_port()
    dask = f"{sys.executable} -m distributed.cli"
    scheduler = start(
        f"{dask}.dask_scheduler --host 127.0.0.1 --port {port} --no-dashboard",
        server,
        tmp_path / "scheduler.log",
    )
    workers = start(
        f"{dask}.dask_worker tcp://127.0.0.1:{port} --nworkers 2 --nthreads 2 --no-dashboard",
        server,
        tmp_path / "workers.log",
    )
    try:
        src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
        command = (
            f"ptqflow quantize {src} {tmp_path / 'out'} --scheme W4A16 --ignore lm_head "
            f"--ignore model.embed_tokens --task-runner dask "
            f"--dask-address tcp://127.0.0.1:{port} --max-workers 2 --device cpu"
        )
        sh(command, server)
    finally:
        stop(workers)
        stop(scheduler)
    assert files(tmp_path / "out") == reference(src, tmp_path / "want", "W4A16")


@pytest.mark.slow
def test_ptqflow_serve(tmp_path):
    """`ptqflow serve` registers the same deployment names, so it gets a server of its own."""
    with prefect_server_process(tmp_path / "home") as server:
        serve_and_run(tmp_path, server)


def serve_and_run(tmp_path: Path, server: dict) -> None:
    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    served = start("ptqflow serve", server, tmp_path / "serve.log")
    try:
        wanted = {
            "quantize-checkpoint/quantize",
            "reindex-fused-weights/reindex",
            "verify-checkpoint/verify",
        }
        wait_until(
            lambda: wanted <= deployments(server), 120, "ptqflow serve to register its deployments"
        )
        sh(
            f"prefect deployment run reindex-fused-weights/reindex -p source={src} "
            f"-p destination={tmp_path / 're'} --watch",
            server,
        )
    finally:
        stop(served)
    assert (tmp_path / "re" / "config.json").read_bytes() == (src / "config.json").read_bytes()


def deployments(env: dict) -> set[str]:
    """`flow/deployment` of every deployment on the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            flows = {f.id: f.name for f in client.read_flows()}
            return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}


def flip_byte(folder: Path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s bytes in its shard."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    header = read_file_header(shard)
    info = header.tensors[tensor]
    at = header.data_start + info.start + info.nbytes // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.mark.slow
def test_worker_runs_the_verify_deployment(tmp_path, deployed):
    """verify-checkpoint/verify on a worker: a good output completes, a damaged one fails
    naming the damaged tensor."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    good = tmp_path / "good"
    quantize_folder(src, good, resolve_config("FP8_BLOCK", ignore=IGNORE))
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    damaged = "model.layers.0.mlp.down_proj.weight"
    flip_byte(bad, damaged)
    run = "prefect deployment run verify-checkpoint/verify -p source={} -p quantized={} --watch"
    worker = start("prefect worker start --pool ptqflow", deployed, tmp_path / "worker.log")
    try:
        assert "Completed" in sh(run.format(src, good), deployed)
        failed = attempt(run.format(src, bad), deployed)
    finally:
        stop(worker)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "'Failed'" in output, output[-3000:]
    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id(output)).state
    assert state.is_failed() and damaged in state.message, state
    # the engine raises the Failed state's data: ptqflow's error, not a TypeError about it
    log = (tmp_path / "worker.log").read_text()
    assert "VerifyFailed: " in log and "TypeError" not in log, log[-3000:]
    assert (good / ".ptqflow/verify/report.md").read_text().startswith("# ptqflow verify: PASSED")
    assert damaged in (bad / ".ptqflow/verify/report.md").read_text()


@pytest.mark.slow
def test_a_port_taken_before_the_server_binds_it_is_tried_again(monkeypatch):
    """flows.server chooses a free port and the server binds it seconds later; a port taken
    meanwhile (here by a listening socket) makes the server exit, and another is tried."""
    import socket

    import flows.server

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        chosen = [taken, free_port()]
        ports = iter(chosen)
        monkeypatch.setattr(flows.server, "free_port", lambda: next(ports))
        with flows.server.server_process() as url:
            assert url == f"http://127.0.0.1:{chosen[1]}/api" and healthy(url), url


def test_a_server_writing_much_to_stderr_does_not_block(tmp_path):
    """flows.server's background process: stderr is never a pipe nobody reads (64 KiB would
    block the writer), and its end is in the error when the process dies before it is ready."""
    from flows.server import background

    ready = tmp_path / "ready"
    chatty = (
        "import pathlib, sys, time; sys.stderr.write('x' * 2**20); sys.stderr.flush(); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    with background(
        [sys.executable, "-c", chatty, str(ready)], ready.exists, timeout=30, what="stand-in"
    ) as proc:
        assert proc.poll() is None
    assert proc.poll() is not None  # stopped with the block

    dying = "import sys; sys.stderr.write('x' * 2**20 + '\\nthe last words'); sys.exit(3)"
    with pytest.raises(RuntimeError, match="stand-in exited with 3") as error:
        with background([sys.executable, "-c", dying], lambda: False, timeout=30, what="stand-in"):
            pass
    assert str(error.value).endswith("\nthe last words") and len(str(error.value)) < 2100
