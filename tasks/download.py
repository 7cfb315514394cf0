"""Stage 2, download: local copies of the source files one output shard reads."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from storage.source import Folder
from tasks.core.transfer import download


@task(
    name="download",
    cache_policy=NO_CACHE,
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
def download_task(source: str, files: list[str], cache_dir: str | None) -> dict[str, str]:
    return download(Folder(source), files, cache_dir)
