"""The `reindex-fused-weights` flow: rewrite a checkpoint so fused sets share a shard.

Its shards run as every flow's do (flows/shards.py), on the task runner built
from its own parameters: `num_workers` shards are copied at once.
"""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow

from flows.options import REINDEX
from flows.shards import run_shards
from storage.dest import open_dest
from storage.source import Folder
from tasks.core.records import Summary
from tasks.core.transfer import cache_dir_for
from tasks.finalize import finalize_task
from tasks.plan import reindex_plan_task

described, DEFAULTS = REINDEX.described, REINDEX.defaults


@flow(name="reindex-fused-weights")
@REINDEX.document
def reindex_fused_weights(
    source: Annotated[str, described("source")],
    destination: Annotated[str, described("destination")],
    num_workers: Annotated[int, described("num_workers")] = DEFAULTS["num_workers"],
    overwrite: Annotated[bool, described("overwrite")] = DEFAULTS["overwrite"],
    revision: Annotated[str | None, described("revision")] = DEFAULTS["revision"],
    cache_dir: Annotated[str | None, described("cache_dir")] = DEFAULTS["cache_dir"],
) -> Summary:
    """Copy SOURCE to DESTINATION with every fused set (q/k/v, gate/up, ...) in one shard."""
    started = time.monotonic()
    plan = reindex_plan_task(source, revision)
    dest = open_dest(destination)
    with dest.writing(plan.source, overwrite):
        cache = cache_dir_for(Folder(plan.source), cache_dir)
        manifests = run_shards(
            plan, None, dest, devices=["cpu"], max_workers=num_workers, cache_dir=cache
        )
        finalize_task(plan, plan.source, dest, manifests)
    seconds = round(time.monotonic() - started, 1)
    return Summary(dest.url, manifests, plan.total_size, seconds)
