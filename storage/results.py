"""Content keys for shard results, and whether a cached result can still be trusted.

A shard's key depends only on what determines its bytes: the fingerprints of
the source files it reads, its plan (tensors read and produced, and which
config group quantizes each), the schemes of those groups, the destination
and the ptqflow version. Results are
small manifests that Prefect persists under that key in the result store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from storage.dest import Dest, default_state_dir
from tasks.plan import Plan, ShardPlan


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


def result_store(dest: Dest, configured: str | None = None):
    """Where shard results persist: `configured` (a folder or an fsspec URL), else beside
    a local DEST, else under PREFECT_HOME. A URL becomes a saved RemoteFileSystem block."""
    if configured and "://" in configured:
        from prefect.filesystems import RemoteFileSystem

        block = RemoteFileSystem(basepath=configured)
        block.save("ptqflow-results-" + hashlib.sha256(configured.encode()).hexdigest()[:12],
                   overwrite=True)  # fmt: skip
        return block
    if configured:
        return Path(configured)
    if dest.folder.is_local:
        return Path(dest.folder.root) / ".ptqflow" / "results"
    return default_state_dir() / "results"


def stored_manifest(store, key: str) -> dict | None:
    """The manifest persisted under `key` in `store` (a folder or a filesystem block)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    if isinstance(store, (str, Path)):
        store = LocalFileSystem(basepath=str(store))
    results = ResultStore(result_storage=store)
    if not results.exists(key):
        return None
    try:
        return results.read(key).result
    except Exception:  # an unreadable record is as good as none: redo the shard
        return None


def still_valid(manifest: dict, dest: Dest) -> bool:
    """Is the output a manifest names still in DEST, with its recorded size and hash?

    The hash is recomputed only when the cheap evidence (size, mtime or ETag)
    changed, so a resume does not read every finished shard again.
    """
    name = manifest["name"]
    info = dest.info(name)
    if info is None or info["size"] != manifest["size"]:
        return False
    if info.get("stamp") == manifest.get("stamp"):
        return True
    return dest.sha256(name) == manifest["sha256"]
