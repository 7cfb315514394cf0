"""Stage 4, upload: hash a finished shard, store it in DEST and record what was stored."""

from __future__ import annotations

from prefect import task

from storage.dest import Dest
from tasks.core.records import Manifest
from tasks.core.transfer import upload


def _key(context, parameters) -> str:
    return parameters["key"]


@task(name="upload", cache_key_fn=_key, persist_result=True, retries=3, retry_delay_seconds=5)
def upload_task(manifest: Manifest | None, dest: Dest, key: str) -> Manifest:
    """Cached under the shard's content `key`: a rerun that finds a valid result skips
    download and quantize, and this task comes back Cached."""
    return upload(manifest, dest)
