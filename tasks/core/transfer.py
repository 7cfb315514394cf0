"""Moving shards: local copies of the source files a shard reads, and finished shards into DEST."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from storage.dest import Dest, default_state_dir
from storage.source import Folder
from tasks.core.records import Manifest

__all__ = [
    "cache_dir_for",
    "download",
    "upload",
]


def cache_dir_for(source: Folder, cache_dir: str | None) -> str | None:
    """Where remote shards go: `cache_dir`, else the HF cache for the Hub, else PREFECT_HOME."""
    if cache_dir or source.is_local or source.is_hub:
        return cache_dir
    return str(default_state_dir() / "downloads")


def download(source: Folder, files: list[str], cache_dir: str | None) -> dict[str, str]:
    """Source file -> local path; local sources are used in place, remote ones copied."""
    cache = Path(cache_dir) if cache_dir else None
    return {rel: str(source.download(rel, cache)) for rel in files}


def upload(manifest: Manifest, dest: Dest) -> Manifest:
    """Put the staged shard into DEST (a no-op for a local DEST), hashed; stamp the manifest.

    Hashing here rather than while quantizing lets it run beside the next
    shard's quantization: the flow chains the stages per shard.
    """
    started = time.perf_counter()
    digest = dest.put(dest.staging / manifest.name, manifest.name)
    info = dest.info(manifest.name)
    if info is None or info["size"] != manifest.size:
        raise OSError(f"{manifest.name} did not arrive whole in {dest.url}")
    stages = {**manifest.stages, "upload": round(time.perf_counter() - started, 3)}
    return replace(manifest, digest=digest, stamp=info["stamp"], stages=stages)
