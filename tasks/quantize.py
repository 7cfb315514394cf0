"""Stage 3, quantize: write one output shard from its downloaded source files."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks.core.records import Manifest, ShardPlan
from tasks.core.shard import write_shard

# Device limits of runs whose tasks are threads of this process: a semaphore each, taken the
# moment it is free, where a Prefect global limit is polled on its server (seconds per shard)
LOCAL_LIMITS: dict[str, threading.BoundedSemaphore] = {}


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

    `limit` names the concurrency limit of `device` (in LOCAL_LIMITS, or Prefect's
    global one), so shards on one GPU never compete for its memory, whichever process
    or machine runs them.
    `key` is recorded beside the shard before it gets its final name.
    """
    schemes = config.config_groups if config is not None else {}
    opener = lambda f: open(paths[f], "rb")  # noqa: E731
    with _slot(limit):
        return write_shard(shard, opener, Path(out_dir), schemes, device, claim=key)
