"""Upload stage: store a finished shard in DEST and record what was stored."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from storage.dest import Dest


def upload(manifest: dict, dest: Dest) -> dict:
    """Put the staged shard into DEST (a no-op for a local DEST) and stamp the manifest."""
    staged = dest.staging / manifest["name"]
    dest.put(staged, manifest["name"])
    info = dest.info(manifest["name"])
    if info is None or info["size"] != manifest["size"]:
        raise OSError(f"{manifest['name']} did not arrive whole in {dest.url}")
    if not dest.folder.is_local:
        Path(staged).unlink(missing_ok=True)
    return {**manifest, "stamp": info["stamp"]}


def _key(context, parameters) -> str:
    return parameters["key"]


@task(name="upload", cache_key_fn=_key, persist_result=True, retries=3, retry_delay_seconds=5)
def upload_task(manifest: dict | None, dest: Dest, key: str) -> dict:
    """Cached under the shard's content `key`: a rerun that finds a valid result skips
    download and quantize, and this task comes back Cached."""
    return upload(manifest, dest)
