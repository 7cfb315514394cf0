"""The devices a run uses: named devices that exist, and the CPUs this process may use.

os.cpu_count() is the host's: in a container limited to 8 CPUs on a 128-core
host it says 128, and 128 busy threads then share 8 CPUs' worth of time.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

from storage.errors import PtqflowError

__all__ = [
    "ARENAS",
    "CGROUP",
    "M_ARENA_MAX",
    "check_devices",
    "limit_malloc_arenas",
    "usable_cpus",
]

CGROUP = Path("/sys/fs/cgroup")
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ARENAS = 2


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs of the affinity mask, at most the cgroup quota (v2 cpu.max, v1 cfs_quota_us)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _quota(cgroup)
    return max(1, min(count or 1, math.ceil(quota) if quota else count or 1))


def _quota(cgroup: Path) -> float | None:
    """The cgroup's CPU quota in CPUs, or None when unlimited or unknown."""
    try:
        text = (cgroup / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def check_devices(device: str | None) -> list[str]:
    """The devices of `--device` (cpu, cuda:N, or several joined by commas), each checked to
    exist here before any work. None is every GPU torch sees (CUDA_VISIBLE_DEVICES), as
    llm-compressor's model_free_ptq takes them, else the CPU."""
    import torch

    if not device:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    names = [d.strip() for d in device.split(",")]
    for name in names:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise PtqflowError(
                f"--device {name!r} is not a device; use cpu, cuda:N or cuda:0,cuda:1"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise PtqflowError(f"--device {name}: ptqflow runs on cpu or cuda:N")
        if dev.type == "cuda":
            count = torch.cuda.device_count()
            if not count:
                raise PtqflowError(
                    f"--device {name}: this machine has no CUDA GPU that torch can use; "
                    "use --device cpu"
                )
            if dev.index is not None and dev.index >= count:
                raise PtqflowError(
                    f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
                )
    return names


@functools.cache
def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at ARENAS for threads that allocate from now on (what
    MALLOC_ARENA_MAX=2 does); False where the C library has no mallopt.

    A thread that allocates while others hold every arena gets one of its own (up to 8
    per core), and what is freed in an arena stays there for reuse. Task threads that
    quantize shard after shard thus grew a flow's peak RSS with the number of shards:
    1159 MiB on a 6 GB checkpoint of 13 shards, 973 MiB with two arenas, no slower
    (glibc's per-thread caches keep small allocations off the arenas' locks).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, ARENAS))
    except (OSError, AttributeError):
        return False
