"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota.

os.cpu_count() is the host's: in a container limited to 8 CPUs on a 128-core
host it says 128, and 128 busy threads then share 8 CPUs' worth of time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


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
