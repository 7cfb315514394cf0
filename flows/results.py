"""Where the quantize flow persists shard manifests: a Prefect result store."""

from __future__ import annotations

import hashlib
from pathlib import Path

from storage.dest import Dest, default_state_dir
from tasks.core.records import Manifest


def result_store(dest: Dest, configured: str | None = None):
    """Where shard results persist: `configured` (a folder or an fsspec URL), else beside
    a local DEST, else under PREFECT_HOME. A URL becomes a saved RemoteFileSystem block."""
    if configured and "://" in configured:
        from prefect.filesystems import RemoteFileSystem

        block = RemoteFileSystem(basepath=configured)
        digest = hashlib.sha256(configured.encode()).hexdigest()[:12]
        block.save(f"ptqflow-results-{digest}", overwrite=True)
        return block
    if configured:
        return Path(configured)
    if dest.folder.is_local:
        return Path(dest.folder.root) / ".ptqflow" / "results"
    return default_state_dir() / "results"


def stored_manifest(store, key: str) -> Manifest | None:
    """The manifest persisted under `key` in `store` (a folder or a filesystem block)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    if isinstance(store, (str, Path)):
        store = LocalFileSystem(basepath=str(store))
    results = ResultStore(result_storage=store)
    if not results.exists(key):
        return None
    try:
        manifest = results.read(key).result
    except Exception:  # an unreadable record is as good as none: redo the shard
        return None
    return manifest if isinstance(manifest, Manifest) else None  # an older ptqflow's record
