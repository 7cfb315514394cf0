"""The per-shard part of every flow: download -> quantize for each shard.

Both flows (quantize-checkpoint and reindex-fused-weights) run their shards
here, on one task runner made from their own parameters: threads in this
process, or Dask workers. The quantize task writes a shard and puts it into
DEST, so no stage reads a file that only another machine has: with Dask, the
shard is written and put on one worker, wherever its download ran.

Resuming: the quantize task's result (the shard's Manifest) is persisted under
the shard's content key (tasks/core/keys.py). Before submitting a shard, the
flow looks that key up. If the recorded shard is still in DEST, it submits the
quantize task alone: its cache key hits, so it returns the stored manifest
without running and shows as Cached. Every other shard's quantize task runs
with `refresh_cache`, so its new manifest replaces any stale record.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.results import result_store, stored_manifest
from storage.dest import Dest
from storage.errors import PtqflowError
from storage.source import Folder
from tasks.core.keys import shard_key, still_valid
from tasks.core.records import Manifest, Plan
from tasks.download import download_task
from tasks.quantize import local_limits, quantize_task


def run_shards(
    plan: Plan,
    config,
    dest: Dest,
    *,
    devices: list[str],
    max_workers: int = 1,
    max_downloaded: int = 2,
    cache_dir: str | None = None,
    result_storage: str | None = None,
    delete_source: bool = False,
    task_runner: str = "threads",
    dask_address: str | None = None,
) -> list[Manifest]:
    """Every shard of `plan` in DEST, in plan order: done here, or found done by an earlier run.

    `config` quantizes (None copies, as reindex does). Shard k quantizes while
    k+1 downloads and k-1 is put into DEST; a per-device concurrency limit bounds
    the shards quantizing at once, and `max_downloaded` those downloaded but not
    yet in DEST. A failed shard fails its own tasks while the others finish;
    then one error names every failed shard.
    """
    logger = get_run_logger()
    store = result_store(dest, result_storage)
    cached_or_run = quantize_task.with_options(result_storage=store)
    redo = cached_or_run.with_options(refresh_cache=True)
    futures, chains, cached, window = {}, {}, set(), []
    with (
        make_runner(task_runner, max_workers, max_downloaded, dask_address) as runner,
        device_limits(devices, max_workers, local=task_runner == "threads") as limits,
    ):
        for i, shard in enumerate(plan.shards):
            key = shard_key(plan, shard, dest.url)
            dev = devices[i % len(devices)]
            stage = dict(
                shard=shard,
                source=plan.source,
                cache_dir=cache_dir,
                config=config,
                dest=dest,
                key=key,
                device=dev,
                limit=limits[dev],
            )
            manifest = stored_manifest(store, key)
            if manifest is not None and still_valid(manifest, dest):
                futures[submit(runner, cached_or_run, shard, paths=None, **stage)] = shard
                cached.add(shard.name)
                continue
            if len(window) >= max_downloaded:  # bounds shards downloaded but not in DEST
                window.pop(0).wait()
            paths = submit(
                runner,
                download_task,
                shard,
                source=plan.source,
                files=shard.files,
                cache_dir=cache_dir,
            )
            # a shard found written is kept, unless a stored result says it has changed since
            q = submit(runner, redo, shard, paths=paths, keep=manifest is None, **stage)
            window.append(q)
            futures[q] = shard
            chains[shard.name] = (paths, q)
        if cached:
            logger.info("%d of %d shards already done (cached)", len(cached), len(plan.shards))
        remote = not Folder(plan.source).is_local
        manifests, failed = _collect(plan, futures, chains, cached, delete_source and remote)
    if failed:
        lines = "\n  ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise PtqflowError(
            f"{len(failed)} of {len(plan.shards)} shards failed ({len(manifests)} done):\n  "
            f"{lines}\nFix the cause and run the same command again: finished shards are kept."
        )
    return [manifests[s.name] for s in plan.shards]


def make_runner(name: str, max_workers: int, max_downloaded: int, address: str | None):
    """Threads in this process, or Dask workers (a LocalCluster, or the cluster at `address`)."""
    if name == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 4, "processes": True}
        )
    if name != "threads":
        raise PtqflowError(f"unknown task runner {name!r}: use threads or dask")
    return ThreadPoolTaskRunner(max_workers=3 * max_workers + max_downloaded + 2)


def submit(runner, task, for_shard, **parameters):
    """Submit one stage of a shard, its run named by stage and shard (`quantize model-0003...`)."""
    name = f"{task.name} {for_shard.name}"
    return runner.submit(task.with_options(task_run_name=name), parameters)


def _collect(plan, futures: dict, chains: dict, cached: set, delete_downloads: bool):
    """Wait for every shard; log progress, update the progress artifact, delete downloads."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="quantize-progress", description="shards done")
    manifests, failed, done_bytes, t0 = {}, {}, 0, time.monotonic()
    todo_bytes = sum(s.bytes_in for s in plan.shards if s.name not in cached)
    for future in as_completed(list(futures)):
        shard = futures[future]
        try:
            manifest = future.result()
        except Exception:
            failed[shard.name] = _failure(chains.get(shard.name, (future,)))
            logger.error("%s failed: %s", shard.name, failed[shard.name])
            continue
        # a shard found written by an earlier run, where it was quantized, is cached too
        manifest = replace(manifest, cached=shard.name in cached or manifest.cached)
        manifests[shard.name] = manifest
        if shard.name not in cached:
            done_bytes += shard.bytes_in
            if delete_downloads:
                _delete_downloads(plan, shard, manifests, chains[shard.name][0].result())
        elapsed = time.monotonic() - t0
        rate = done_bytes / elapsed if elapsed else 0.0
        eta = (todo_bytes - done_bytes) / rate if rate else 0.0
        logger.info(
            "[%d/%d] %s %s  %.2f GB read, %.3f GB/s, ETA %.0f s",
            len(manifests) + len(failed),
            len(plan.shards),
            shard.name,
            "cached" if manifest.cached else "done",
            done_bytes / 1e9,
            rate / 1e9,
            eta,
        )
        update_progress_artifact(progress, 100.0 * len(manifests) / len(plan.shards))
    return manifests, failed


@contextmanager
def device_limits(devices: list[str], max_workers: int, local: bool):
    """One concurrency limit per device, private to this flow run: a GPU takes one shard at
    a time, the CPU `max_workers`. `local`: the tasks are threads of this process, so a
    semaphore each (tasks/quantize.py `local_limits`); else a Prefect global concurrency
    limit, named by run, so a killed run's leftover slots never block the next one."""
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    run_id = get_run_context().flow_run.id
    limits = {d: f"ptqflow-{run_id}-{d.replace(':', '')}" for d in devices}
    slots = {d: 1 if d.startswith("cuda") else max_workers for d in devices}
    if local:
        with local_limits({limits[d]: slots[d] for d in devices}):
            yield limits
        return
    with get_client(sync_client=True) as client:
        for dev, name in limits.items():
            client.upsert_global_concurrency_limit_by_name(name, slots[dev])
        try:
            yield limits
        finally:
            # One attempt each: a server busy with the run's last state writes answers 503,
            # and the client's retry would sleep 2 s for a limit no one uses any more.
            with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
                for name in limits.values():
                    try:
                        client.delete_global_concurrency_limit_by_name(name)
                    except Exception as e:  # left behind, as after a kill: it holds nothing
                        get_run_logger().debug("concurrency limit %s not deleted: %s", name, e)


def _failure(chain) -> str:
    """The message of the first failed stage of a shard's download -> quantize."""
    for future in chain:
        try:
            future.result()
        except Exception as e:  # the stage's own exception says what went wrong
            return str(e) or type(e).__name__
    return "failed"


def _delete_downloads(plan: Plan, finished, manifests: dict, paths: dict[str, str]) -> None:
    """Delete downloaded copies of `finished`'s source files that no pending shard needs.

    An HF-cache path is a link to a blob: both go.
    """
    pending = {f for s in plan.shards if s.name not in manifests for f in s.files}
    for f in set(finished.files) - pending:
        copy = Path(paths[f])
        if copy.is_symlink():
            copy.resolve().unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
