"""Stage 3, quantize: write one output shard from its downloaded source files."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks.core.records import Manifest, ShardPlan
from tasks.core.shard import write_shard

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


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(
    shard: ShardPlan,
    paths: dict[str, str],
    out_dir: str,
    config,
    device: str = "cpu",
    limit: str | None = None,
    key: str | None = None,
) -> Manifest:
    """Quantize one shard from downloaded `paths` with `config` (None copies, as reindex does).

    `limit` names the concurrency limit of `device` (a `local_limits` one, or Prefect's
    global one), so shards on one GPU never compete for its memory, whichever process
    or machine runs them.
    `key` is recorded beside the shard before it gets its final name.
    """
    schemes = config.config_groups if config is not None else {}
    opener = lambda f: open(paths[f], "rb")  # noqa: E731
    with _slot(limit):
        return write_shard(shard, opener, Path(out_dir), schemes, device, claim=key)
