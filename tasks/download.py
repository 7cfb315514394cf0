"""Download stage: local copies of the source files one output shard reads."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from storage.source import Folder


def cache_dir_for(source: Folder, cache_dir: str | None) -> str | None:
    """Where remote shards go: `cache_dir`, else the HF cache for the Hub, else PREFECT_HOME."""
    if cache_dir or source.is_local or source.is_hub:
        return cache_dir
    from storage.dest import default_state_dir

    return str(default_state_dir() / "downloads")


def download(source: Folder, files: list[str], cache_dir: Path | None) -> dict[str, str]:
    """Source file -> local path; local sources are used in place, remote ones copied."""
    return {rel: str(source.download(rel, cache_dir)) for rel in files}


@task(
    name="download",
    cache_policy=NO_CACHE,
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def download_task(source: str, files: list[str], cache_dir: str | None) -> dict[str, str]:
    return download(Folder(source), files, Path(cache_dir) if cache_dir else None)
