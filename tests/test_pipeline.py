"""The resumable pipeline: remote sources and destinations, content-keyed caching, kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pytest

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import (
    CLI,
    IGNORE,
    ROOT,
    files,
    quantize_folder,
    remote_files,
    run,
    upload_folder,
)

pytestmark = pytest.mark.slow  # Prefect servers, workers, subprocesses


def test_memory_source_and_destination_resume_from_cache(tmp_path, prefect_server):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
    quantize_folder(src, tmp_path / "want", resolve_config("NVFP4A16", ignore=IGNORE))
    upload_folder(src, "memory://ckpt/src")
    first = run(
        "memory://ckpt/src", "memory://ckpt/out", max_workers=2, cache_dir=str(tmp_path / "dl")
    )
    assert (first.quantized, first.cached) == (3, 0)
    assert remote_files("memory://ckpt/out") == files(tmp_path / "want")
    again = run("memory://ckpt/src", "memory://ckpt/out", cache_dir=str(tmp_path / "dl"))
    assert (again.quantized, again.cached) == (0, 3)
    assert remote_files("memory://ckpt/out") == files(tmp_path / "want")


def test_changed_scheme_ignore_or_source_invalidates_what_it_must(tmp_path, prefect_server):
    src = build_checkpoint(tmp_path / "src", "llama", shards=3)
    out = str(tmp_path / "out")
    assert run(str(src), out, "FP8_BLOCK").quantized == 3
    # another scheme: nothing stale is reused
    result = run(str(src), out, "W4A16")
    assert (result.quantized, result.cached) == (3, 0)
    quantize_folder(src, tmp_path / "w4", resolve_config("W4A16", ignore=IGNORE))
    assert files(Path(out)) == files(tmp_path / "w4")
    # one more ignored module: only the shard holding it is redone
    index = json.loads((tmp_path / "w4/model.safetensors.index.json").read_text())["weight_map"]
    holder = index["model.layers.1.mlp.down_proj.weight_packed"]
    result = run(str(src), out, "W4A16", ignore=[*IGNORE, "model.layers.1.mlp.down_proj"])
    assert [m.name for m in result.shards if not m.cached] == [holder]
    # back to the first ignore list, and a source shard that changed (new mtime):
    # its fingerprint changes, so the shards reading it are redone too
    changed = "model-00002-of-00003.safetensors"
    os.utime(src / changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    result = run(str(src), out, "W4A16")
    assert sorted(m.name for m in result.shards if not m.cached) == sorted({holder, changed})
    assert files(Path(out)) == files(tmp_path / "w4")


def test_cached_result_redone_when_output_changed(tmp_path, prefect_server):
    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    out = tmp_path / "out"
    run(str(src), str(out), "FP8_DYNAMIC")
    victim = out / "model-00001-of-00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, new mtime
    victim.write_bytes(bytes(data))
    result = run(str(src), str(out), "FP8_DYNAMIC")
    assert (result.quantized, result.cached) == (1, 1)
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_DYNAMIC", ignore=IGNORE))
    assert files(out) == files(tmp_path / "want")


def test_s3_source_and_destination(tmp_path, prefect_server, s3):
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    upload_folder(src, "s3://models/ds")
    result = run(
        "s3://models/ds",
        "s3://models/ds-w4a16",
        "W4A16",
        max_workers=2,
        cache_dir=str(tmp_path / "dl"),
        delete_source=True,
    )
    assert result.quantized == 3
    quantize_folder(src, tmp_path / "want", resolve_config("W4A16", ignore=IGNORE))
    assert remote_files("s3://models/ds-w4a16") == files(tmp_path / "want")
    assert not [p for p in (tmp_path / "dl").rglob("*.safetensors")]  # --delete-source
    again = run("s3://models/ds", "s3://models/ds-w4a16", "W4A16", cache_dir=str(tmp_path / "dl"))
    assert (again.quantized, again.cached) == (0, 3)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def server_processes(home: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "server" in (p.info["cmdline"] or []) and p.environ().get("PREFECT_HOME") == home:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def finished_shards(out: Path) -> dict[str, tuple[int, int, str]]:
    """(mtime, inode, sha256) of every shard under its final name in `out`."""
    return {
        p.name: (p.stat().st_mtime_ns, p.stat().st_ino, sha(p))
        for p in sorted(out.glob("model-*.safetensors"))
    }


@pytest.mark.parametrize("seed", [0])
def test_kill_9_at_random_moments_then_rerun_resumes_byte_identical(tmp_path, seed):
    """kill -9 of the CLI's whole process group at random moments (planning, quantizing,
    hashing, finalizing), again and again: a shard file under its final name is never touched
    again (mtime, inode, hash), nothing of a killed run keeps running, and the run that
    finishes ends byte-identical to an uninterrupted one, model card and all."""
    import random

    from benchmarks.make_checkpoint import make_checkpoint

    # enough shards for every kill below to find work left, however fast a shard goes
    src = make_checkpoint(tmp_path / "src", size_gb=0.5, shard_gb=0.025, hidden=1024)
    n_shards = len(list(src.glob("*.safetensors")))
    out = tmp_path / "out"
    home = str(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=home, PYTHONPATH=str(ROOT))
    cmd = [*CLI, "quantize", str(src), str(out), "--scheme", "NVFP4A16"]
    cmd += ["--ignore", "lm_head", "--device", "cpu"]
    # an uninterrupted run first: what every run into `out` must end as, its model card too
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    want = files(out, card=True)
    shutil.rmtree(out)
    rng = random.Random(seed)
    kept: dict[str, tuple[int, int, str]] = {}
    kills = 0
    index = out / "model.safetensors.index.json"

    def wait(until) -> None:
        while not until() and proc.poll() is None:
            time.sleep(0.002)

    for attempt in range(6):
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        done = len(list(out.glob("model-*.safetensors")))
        if attempt in (0, 2, 3):  # quantizing or hashing: a random moment after a new shard
            wait(lambda done=done: len(list(out.glob("model-*.safetensors"))) > done)
            time.sleep(rng.uniform(0, 0.3))
        elif attempt == 1:  # starting or planning (at the latest, as its first shard lands)
            deadline = time.monotonic() + rng.uniform(0, 12)
            wait(
                lambda done=done, deadline=deadline: (
                    time.monotonic() > deadline or len(list(out.glob("model-*.safetensors"))) > done
                )
            )
        elif attempt == 4:  # finalizing: between the index and config.json
            wait(index.exists)
        if attempt < 5 and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            time.sleep(1)
            assert server_processes(home) == []  # nothing of the killed run is left running
        else:
            output = proc.communicate(timeout=600)[0].decode()
            assert proc.returncode == 0, output[-3000:]
        now = finished_shards(out)
        for name, stamp in kept.items():
            assert now.get(name) == stamp, f"{name} was touched after it was finished"
        kept.update(now)
        if proc.returncode == 0:
            break
    assert kills >= 4 and 1 <= len(kept) <= n_shards, (kills, len(kept))
    assert server_processes(home) == []
    assert files(out, card=True) == want
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.partial"))


def test_artifacts_and_remote_result_storage(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client

    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    kw = {"result_storage": "memory://ptqflow-results/run1"}
    first = run(str(src), str(tmp_path / "out"), "FP8_BLOCK", **kw)
    assert fsspec.filesystem("memory").ls("/ptqflow-results/run1")  # records went there
    again = run(str(src), str(tmp_path / "out"), "FP8_BLOCK", **kw)
    assert (first.cached, again.cached) == (0, 2)
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["quantize-shards"])),
        )
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["quantize-progress"])),
        )
    table = max((a for a in latest if a.type == "table"), key=lambda a: a.created)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted((r["shard"], r["cached"]) for r in rows) == [
        ("model-00001-of-00002.safetensors", True),
        ("model-00002-of-00002.safetensors", True),
    ]
    assert any(a.data == 100.0 for a in progress)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root, as on CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_with_a_clear_error_and_the_rerun_resumes(tmp_path, small_disk):
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=4)
    out = small_disk / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "ph"))
    cmd = [
        *CLI,
        "quantize",
        str(src),
        str(out),
        "--scheme",
        "FP8_DYNAMIC",
        "--ignore",
        "lm_head",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.split("ptqflow: error: ")[-1]
    assert "shards failed" in message and "disk full while writing" in message
    assert not (out / "config.json").exists() and not list(out.glob(".*.partial"))
    kept = sorted(p.name for p in out.glob("model-*.safetensors"))
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cached = [line.split()[0] for line in proc.stdout.splitlines() if " cached " in line]
    assert kept and len(set(kept) - set(cached)) <= 1  # a record may not fit on the full disk
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_DYNAMIC", ignore=["lm_head"]))
    assert files(out) == files(tmp_path / "want")


def test_prefect_flow_run_retry_reuses_finished_shards(tmp_path, prefect_server, small_disk):
    """A failed run retried with `prefect flow-run retry` finishes, finished shards Cached."""
    from prefect.settings import PREFECT_API_URL

    from flows.quantize import run_quantize

    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=4)
    out = small_disk / "out"
    state = run_quantize(
        source=str(src),
        destination=str(out),
        scheme="FP8_DYNAMIC",
        ignore=["lm_head"],
        device="cpu",
        return_state=True,
    )
    assert state.is_failed()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    assert kept, "no shard finished before the disk filled up"
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    retry = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "flow-run",
            "retry",
            str(state.state_details.flow_run_id),
            "--entrypoint",
            "flows/quantize.py:quantize_checkpoint",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
    assert "Cached" in retry.stdout + retry.stderr
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime, name
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_DYNAMIC", ignore=["lm_head"]))
    assert files(out) == files(tmp_path / "want")


def test_interrupted_remote_download_resumes(tmp_path):
    from storage.source import Folder

    data = os.urandom(3 * 2**20)
    fsspec.filesystem("memory").pipe_file("/resume/model.safetensors", data)
    folder = Folder("memory://resume")
    first = folder.download("model.safetensors", tmp_path, chunk=2**20)
    assert first.read_bytes() == data
    # an interrupted copy left 1 MiB behind; the next download appends the rest
    first.unlink()
    partial = first.with_name(f".{first.name}.partial")
    partial.write_bytes(b"\0" * 2**20)
    again = folder.download("model.safetensors", tmp_path, chunk=2**20)
    assert again == first and again.read_bytes() == b"\0" * 2**20 + data[2**20 :]
