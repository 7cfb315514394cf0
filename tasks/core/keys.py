"""Content keys for shard results, and whether a recorded result can still be trusted.

A shard's key depends only on what determines its bytes: the fingerprints of
the source files it reads, its plan (tensors read and produced, and which
config group quantizes each), the schemes of those groups, the destination
and the ptqflow version. The flow persists each shard's `Manifest` under its
key (flows/results.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from storage.dest import Dest
from tasks.core.records import Manifest, Plan, ShardPlan

__all__ = [
    "ptqflow_version",
    "shard_key",
    "still_valid",
]


def ptqflow_version() -> str:
    try:
        return version("ptqflow")
    except PackageNotFoundError:
        return "dev"


def shard_key(plan: Plan, shard: ShardPlan, dest: str) -> str:
    groups = sorted({u.group for u in shard.units if u.group is not None})
    content = {
        "ptqflow": ptqflow_version(),
        # only the schemes this shard uses: an ignore entry elsewhere does not touch it
        "schemes": {g: plan.config["config_groups"][g] for g in groups},
        "shard": asdict(shard),
        "sources": {f: plan.fingerprints[f] for f in shard.files},
        "dest": dest,
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return "ptqflow-shard-" + hashlib.sha256(text.encode()).hexdigest()


def still_valid(manifest: Manifest, dest: Dest) -> bool:
    """Is the shard a manifest names still in DEST, with its recorded size and hash?

    The hash is recomputed only when the cheap evidence (size, mtime or ETag)
    changed, so a resume does not read every finished shard again.
    """
    info = dest.info(manifest.name)
    if info is None or info["size"] != manifest.size:
        return False
    if info.get("stamp") == manifest.stamp:
        return True
    if not manifest.digest:
        return False
    algorithm = manifest.digest.partition(":")[0]
    return dest.digest(manifest.name, algorithm) == manifest.digest
