"""What the tests share: paths, the usual ignore list, byte comparisons, ways to run ptqflow.

Test modules import from here (and from the builders: checkpoints.py,
prequantized.py; the references: reference.py, fakehub.py), never from each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import torch

from storage.names import README
from tasks.core.pipeline import quantize
from tasks.core.records import Summary
from tasks.core.schemes import resolve_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows.cli"]  # `ptqflow`, from this checkout


IGNORE = ["lm_head", "re:.*mlp.gate$", "model.embed_tokens"]
# every compressed-tensors preset that needs no calibration data
SCHEMES = [
    "FP8_DYNAMIC", "FP8_BLOCK", "W8A16", "W4A16", "W4A16_ASYM", "W8A8", "INT8", "W4AFP8",
    "NVFP4A16", "MXFP4A16", "MXFP4", "MXFP8A16", "MXFP8",
]  # fmt: skip


FUSED = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)


def files(folder: Path, card: bool = False) -> dict[str, bytes]:
    """Every visible file below `folder` with its bytes; its model card (README.md, which
    names its DEST and the command that wrote it) only with `card`."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and (card or p.relative_to(folder) != Path(README))
    }


def assert_same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = got[k], want[k]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), k
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k


def scheme_of(name: str):
    """The QuantizationScheme of a preset."""
    (scheme,) = resolve_config(name).config_groups.values()
    return scheme


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm-compressor's split of 3-D fused experts into per-expert 2-D weights."""
    out = {}
    for name, t in tensors.items():
        if t.ndim == 3 and name.endswith("experts.gate_up_proj"):
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif t.ndim == 3 and name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
        else:
            out[name] = t
    return out


def default_groups(tensors, scheme, ignore=IGNORE):
    """Weight name -> scheme for the weights llm-compressor's model_free_ptq quantizes."""
    import re

    def ignored(module):
        return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)

    return {
        n: scheme
        for n, t in tensors.items()
        if n.endswith(".weight")
        and t.ndim == 2
        and not n[:-7].endswith("norm")
        and not ignored(n[:-7])
    }


def quantize_folder(src, dst, config, **options) -> Summary:
    """What the quantize-checkpoint flow does, without Prefect (options: plan_checkpoint's)."""
    return quantize(src, dst, config, **options)


def run(source: str, dest: str, scheme: str = "NVFP4A16", ignore=IGNORE, **kw) -> Summary:
    """The quantize-checkpoint flow on the CPU (needs the prefect_server fixture)."""
    from flows.quantize import run_quantize

    return run_quantize(
        source=source, destination=dest, scheme=scheme, ignore=ignore, device="cpu", **kw
    )


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`ptqflow ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def upload_folder(local: Path, url: str) -> None:
    """Copy a local folder to an fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{root}/{p.relative_to(local)}", p.read_bytes())


def remote_files(url: str, card: bool = False) -> dict[str, bytes]:
    """Every visible file below an fsspec URL with its bytes (the model card with `card`)."""
    fs, root = fsspec.core.url_to_fs(url)
    found = {p[len(root) + 1 :]: p for p in sorted(fs.find(root))}
    return {
        rel: fs.cat_file(p)
        for rel, p in found.items()
        if not any(part.startswith(".") for part in rel.split("/")) and (card or rel != README)
    }


HOLD = """
import sys, time
from storage.dest import open_dest
open_dest(sys.argv[1]).lease().acquire()
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def hold_lease(dest: Path) -> Iterator[subprocess.Popen]:
    """Another process holding DEST's lease; killed with -9 (and reaped) on leaving."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(dest)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def concurrency_limits():
    """Record this run's Prefect global concurrency limits while it runs, from the API:
    {name: (slots, most slots taken at once)}."""
    from prefect.client.orchestration import get_client

    seen: dict[str, tuple[int, int]] = {}
    stop, started = threading.Event(), threading.Event()

    def poll() -> None:
        with get_client(sync_client=True) as client:
            # limits an earlier test's run left on the shared server are not this run's
            before = {limit.name for limit in client.read_global_concurrency_limits(limit=200)}
            started.set()
            while not stop.is_set():
                for limit in client.read_global_concurrency_limits(limit=200):
                    if limit.name.startswith("ptqflow-") and limit.name not in before:
                        _, most = seen.get(limit.name, (0, 0))
                        seen[limit.name] = (limit.limit, max(most, limit.active_slots))
                time.sleep(0.05)

    context = contextvars.copy_context()  # the test server's settings
    thread = threading.Thread(target=context.run, args=(poll,), daemon=True)
    thread.start()
    started.wait(30)
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=30)
