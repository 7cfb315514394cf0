"""Stage 3, quantize: write one output shard from its source files and put it into DEST."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from prefect import task
from prefect.concurrency.sync import concurrency

from storage.dest import Dest
from storage.source import Folder
from tasks.core.records import Manifest, ShardPlan
from tasks.core.shard import staged, write_shard
from tasks.core.transfer import UploadError, local_copies, upload

# Device limits of runs whose tasks are threads of this process: written by `local_limits` only
LOCAL_LIMITS: dict[str, threading.BoundedSemaphore] = {}


@contextmanager
def local_limits(slots: dict[str, int]) -> Iterator[None]:
    """Within the block, the limits named in `slots` are semaphores of this process with
    that many slots each: for tasks that are its threads, a slot is taken the moment it is
    free, where a Prefect global limit is polled on its server (seconds per shard)."""
    LOCAL_LIMITS.update({name: threading.BoundedSemaphore(n) for name, n in slots.items()})
    try:
        yield
    finally:
        for name in slots:
            LOCAL_LIMITS.pop(name, None)


def _slot(limit: str | None) -> AbstractContextManager:
    if limit is None:
        return nullcontext()
    return LOCAL_LIMITS.get(limit) or concurrency(limit, strict=True)


def _key(context, parameters) -> str:
    return parameters["key"]


def _put_failed(task, task_run, state) -> bool:
    """Retry only a shard that was written but not put: the retry puts it again."""
    return isinstance(state.result(raise_on_failure=False), UploadError)


@task(
    name="quantize",
    cache_key_fn=_key,
    persist_result=True,
    retries=3,
    retry_delay_seconds=5,
    retry_condition_fn=_put_failed,
)
def quantize_task(
    shard: ShardPlan,
    paths: dict[str, str] | None,
    source: str,
    cache_dir: str | None,
    config,
    dest: Dest,
    key: str,
    device: str = "cpu",
    limit: str | None = None,
    keep: bool = True,
) -> Manifest:
    """Write one shard with `config` (None copies, as reindex does) and put it into DEST.

    One task writes and puts, so a shard never has to be found on another machine:
    source files the download left on another machine (`paths` are its local copies)
    are downloaded again here, and with `keep`, a shard this machine already wrote for
    `key` (a run killed before its result was stored) is only put. `limit` names the
    concurrency limit of `device` (a `local_limits` one, or Prefect's global one), held
    while the shard is written, so shards on one GPU never compete for its memory,
    whichever process or machine runs them; the put runs after it, beside the next
    shard's quantization.

    Its result is cached under the shard's content `key`: a rerun that finds a valid
    result submits this task alone, without a download, and it comes back Cached.
    """
    manifest = staged(dest.staging, shard, key) if keep else None
    if manifest is None:
        local = local_copies(Folder(source), shard.files, cache_dir, paths)
        schemes = config.config_groups if config is not None else {}
        opener = lambda f: open(local[f], "rb")  # noqa: E731
        with _slot(limit):
            manifest = write_shard(shard, opener, dest.staging, schemes, device, claim=key)
    return upload(manifest, dest)
