"""Moving shards: local copies of the source files a shard reads, and finished shards into DEST."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from storage.dest import Dest, default_state_dir
from storage.source import Folder
from tasks.core.records import Manifest

__all__ = [
    "UploadError",
    "cache_dir_for",
    "download",
    "local_copies",
    "upload",
]


class UploadError(OSError):
    """A finished shard did not get into DEST. Worth retrying: the shard it failed to put
    is still staged, and the retry only puts it again."""


def cache_dir_for(source: Folder, cache_dir: str | None) -> str | None:
    """Where remote shards go: `cache_dir`, else the HF cache for the Hub, else PREFECT_HOME."""
    if cache_dir or source.is_local or source.is_hub:
        return cache_dir
    return str(default_state_dir() / "downloads")


def download(source: Folder, files: list[str], cache_dir: str | None) -> dict[str, str]:
    """Source file -> local path; local sources are used in place, remote ones copied."""
    cache = Path(cache_dir) if cache_dir else None
    return {rel: str(source.download(rel, cache)) for rel in files}


def local_copies(
    source: Folder, files: list[str], cache_dir: str | None, paths: dict[str, str] | None
) -> dict[str, str]:
    """Source file -> local path: `paths` (what a download made) where this machine has
    them, the others downloaded here, as the download may have run on another machine."""
    found = {rel: p for rel, p in (paths or {}).items() if rel in files and os.path.isfile(p)}
    missing = [rel for rel in files if rel not in found]
    return {**found, **download(source, missing, cache_dir)}


def upload(manifest: Manifest, dest: Dest) -> Manifest:
    """Put the shard staged on this machine into DEST (a no-op for a local DEST), hashed;
    stamp the manifest. Raises UploadError if it does not get there whole.

    The quantize task calls it once the shard is written and its device is free,
    so it runs beside the next shard's quantization.
    """
    started = time.perf_counter()
    try:
        digest = dest.put(dest.staging / manifest.name, manifest.name)
        info = dest.info(manifest.name)
    except Exception as e:  # the failure's own words, as the stage's message
        raise UploadError(str(e) or type(e).__name__) from e
    if info is None or info["size"] != manifest.size:
        raise UploadError(f"{manifest.name} did not arrive whole in {dest.url}")
    stages = {**manifest.stages, "upload": round(time.perf_counter() - started, 3)}
    return replace(manifest, digest=digest, stamp=info["stamp"], stages=stages)
