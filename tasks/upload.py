"""Upload stage: hash a finished shard, store it in DEST and record what was stored."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from storage.dest import Dest
from storage.direct import sha256_file


def upload(manifest: dict, dest: Dest) -> dict:
    """Hash the staged shard, put it into DEST (a no-op for a local DEST), stamp the manifest.

    Hashing here rather than in the quantize stage lets it run beside the next
    shard's quantization: the flow chains the stages per shard.
    """
    started = time.perf_counter()
    staged = dest.staging / manifest["name"]
    digest = sha256_file(staged)
    dest.put(staged, manifest["name"])
    info = dest.info(manifest["name"])
    if info is None or info["size"] != manifest["size"]:
        raise OSError(f"{manifest['name']} did not arrive whole in {dest.url}")
    if not dest.folder.is_local:
        Path(staged).unlink(missing_ok=True)
    stages = {**manifest.get("stages", {}), "upload": round(time.perf_counter() - started, 3)}
    return {**manifest, "sha256": digest, "stamp": info["stamp"], "stages": stages}


def _key(context, parameters) -> str:
    return parameters["key"]


@task(name="upload", cache_key_fn=_key, persist_result=True, retries=3, retry_delay_seconds=5)
def upload_task(manifest: dict | None, dest: Dest, key: str) -> dict:
    """Cached under the shard's content `key`: a rerun that finds a valid result skips
    download and quantize, and this task comes back Cached."""
    return upload(manifest, dest)
