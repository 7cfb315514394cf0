"""The `reindex-fused-weights` flow: rewrite a checkpoint so fused sets share a shard."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from storage.dest import Dest
from storage.source import Folder, open_source
from tasks.download import cache_dir_for, download
from tasks.finalize import finalize_task
from tasks.planner import load_source, reindex_plan
from tasks.quantize import write_shard
from tasks.upload import upload


@task(name="plan-reindex", cache_policy=NO_CACHE)
def reindex_plan_task(source: str, revision: str | None = None):
    return reindex_plan(load_source(open_source(source, revision)))


@task(name="copy-shard", cache_policy=NO_CACHE)
def copy_shard_task(shard, source: str, dest: Dest, cache_dir: str | None) -> dict:
    folder = Folder(source)
    cache = cache_dir_for(folder, cache_dir)
    paths = download(folder, shard.files, Path(cache) if cache else None)
    manifest = write_shard(shard, lambda f: open(paths[f], "rb"), dest.staging, {})
    return upload(manifest, dest)


@flow(name="reindex-fused-weights")
def reindex_fused_weights(
    source: str,
    destination: str,
    num_workers: int = 1,
    overwrite: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Copy SOURCE to DESTINATION with every fused set (q/k/v, gate/up, ...) in one shard."""
    plan = reindex_plan_task(source, revision)
    dest = Dest(destination)
    dest.prepare(plan.source, overwrite)
    futures = [copy_shard_task.submit(s, plan.source, dest, cache_dir) for s in plan.shards]
    manifests = [f.result() for f in futures]
    finalize_task(plan, plan.source, dest, manifests)
    return {"destination": dest.url, "shards": manifests}


def run_reindex(source: str, destination: str, num_workers: int = 1, **params) -> dict:
    runner = ThreadPoolTaskRunner(max_workers=max(1, num_workers))
    return reindex_fused_weights.with_options(task_runner=runner)(
        source, destination, num_workers, **params
    )
