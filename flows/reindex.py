"""The `reindex-fused-weights` flow: rewrite a checkpoint so fused sets share a shard."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from storage.dest import Dest
from storage.source import Folder
from tasks.finalize import finalize_task
from tasks.quantize import write_shard
from tasks.reindex import load_source, reindex_plan
from tasks.upload import upload


@task(name="plan-reindex", cache_policy=NO_CACHE)
def reindex_plan_task(source: str):
    return reindex_plan(load_source(Folder(source)))


@task(name="copy-shard", cache_policy=NO_CACHE)
def copy_shard_task(shard, source: str, dest: Dest) -> dict:
    return upload(write_shard(shard, Folder(source).open, dest.staging, {}), dest)


@flow(name="reindex-fused-weights")
def reindex_fused_weights(
    source: str, destination: str, num_workers: int = 1, overwrite: bool = False
) -> dict:
    """Copy SOURCE to DESTINATION with every fused set (q/k/v, gate/up, ...) in one shard."""
    plan = reindex_plan_task(source)
    dest = Dest(destination)
    dest.prepare(plan.source, overwrite)
    futures = [copy_shard_task.submit(s, plan.source, dest) for s in plan.shards]
    manifests = [f.result() for f in futures]
    finalize_task(plan, plan.source, dest, manifests)
    return {"destination": dest.url, "shards": manifests}


def run_reindex(source: str, destination: str, num_workers: int = 1, overwrite: bool = False):
    runner = ThreadPoolTaskRunner(max_workers=max(1, num_workers))
    return reindex_fused_weights.with_options(task_runner=runner)(
        source, destination, num_workers, overwrite
    )
