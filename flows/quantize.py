"""The `quantize-checkpoint` flow and llm-compressor's `model_free_ptq` entry point.

The flow only wires tasks. Per shard: download -> quantize -> upload, after
the reindex-fused-weights planning task and before finalize. Shards overlap
(shard k quantizes while k+1 downloads and k-1 uploads); `max_workers` bounds
quantizing shards and `max_downloaded` the shards downloaded but not yet
quantized. The upload result is cached under a content key, so a rerun skips
every shard whose output is still in DEST.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from storage.dest import Dest, default_state_dir
from storage.results import result_store, shard_key, still_valid, stored_manifest
from storage.source import Folder
from tasks.download import download_task
from tasks.errors import PtqflowError
from tasks.finalize import finalize_task
from tasks.quantize import quantize_task
from tasks.reindex import plan_task
from tasks.schemes import resolve_config
from tasks.upload import upload_task


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@flow(name="quantize-checkpoint")
def quantize_checkpoint(
    source: str,
    destination: str,
    scheme: str | None = None,
    config: str | dict | None = None,
    ignore: list[str] | None = None,
    max_workers: int = 1,
    device: str | None = None,
    overwrite: bool = False,
    include_other_weights: bool = False,
    cache_dir: str | None = None,
    result_storage: str | None = None,
    max_downloaded: int = 2,
    delete_source: bool = False,
    revision: str | None = None,
    private: bool = False,
) -> dict:
    """Quantize SOURCE into DESTINATION with a preset `scheme` or a QuantizationConfig.

    SOURCE is a folder, a Hub repo id (at `revision`) or an fsspec URL;
    DESTINATION a folder, `hf://org/name` (created, `private` if asked) or an fsspec URL.
    """
    logger = get_run_logger()
    started = time.monotonic()
    qconfig = resolve_config(scheme, config, ignore or [])
    plan = plan_task(source, qconfig, include_other_weights, revision)
    dest = Dest(destination, private=private)
    dest.prepare(plan.source, overwrite)
    store = result_store(dest, result_storage)
    remote = not Folder(plan.source).is_local
    hub = plan.source.startswith("hf://")
    cache = cache_dir or (None if hub else str(default_state_dir() / "downloads"))
    device = device or default_device()
    upload = upload_task.with_options(result_storage=store)
    redo = upload.with_options(refresh_cache=True)
    slots = threading.BoundedSemaphore(max(1, max_downloaded))
    running = threading.BoundedSemaphore(max(1, max_workers))
    futures, chains, cached = {}, {}, set()
    for shard in plan.shards:
        key = shard_key(plan, shard, dest.url)
        manifest = stored_manifest(store, key)
        if manifest is not None and still_valid(manifest, dest):
            futures[upload.submit(None, dest, key)] = shard
            cached.add(shard.name)
            continue
        paths = download_task.submit(plan.source, shard.files, cache, slots)
        q = quantize_task.submit(shard, paths, str(dest.staging), qconfig, device, slots, running)
        futures[redo.submit(q, dest, key)] = shard
        chains[shard.name] = (paths, q)
    if cached:
        logger.info("%d of %d shards already done (cached)", len(cached), len(plan.shards))

    progress = create_progress_artifact(0.0, key="quantize-progress", description="shards done")
    manifests, done_bytes, t0 = {}, 0, time.monotonic()
    todo_bytes = sum(s.bytes_in for s in plan.shards if s.name not in cached)
    failed: dict[str, str] = {}
    for future in as_completed(list(futures)):
        shard = futures[future]
        try:
            manifest = future.result()
        except Exception:
            failed[shard.name] = _failure(chains.get(shard.name, ()) + (future,))
            logger.error("%s failed: %s", shard.name, failed[shard.name])
            continue
        manifests[shard.name] = {**manifest, "cached": shard.name in cached}
        if shard.name not in cached:
            done_bytes += shard.bytes_in
            if delete_source and remote:
                _delete_downloads(plan, shard, manifests, chains[shard.name][0].result())
        elapsed = time.monotonic() - t0
        rate = done_bytes / elapsed if elapsed else 0.0
        eta = (todo_bytes - done_bytes) / rate if rate else 0.0
        logger.info(
            "[%d/%d] %s %s  %.2f GB read, %.3f GB/s, ETA %.0f s",
            len(manifests), len(plan.shards), shard.name,
            "cached" if shard.name in cached else "done", done_bytes / 1e9, rate / 1e9, eta,
        )  # fmt: skip
        update_progress_artifact(progress, 100.0 * len(manifests) / len(plan.shards))
    if failed:
        lines = "\n  ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise PtqflowError(
            f"{len(failed)} of {len(plan.shards)} shards failed ({len(manifests)} done):\n  "
            f"{lines}\nFix the cause and run the same command again: finished shards are kept."
        )
    ordered = [manifests[s.name] for s in plan.shards]
    finalize_task(plan, plan.source, dest, ordered)
    summary = {
        "destination": dest.url,
        "shards": ordered,
        "total_size": plan.total_size,
        "quantized": len(plan.shards) - len(cached),
        "cached": len(cached),
        "seconds": round(time.monotonic() - started, 1),
    }
    _table(summary)
    return summary


def _failure(chain) -> str:
    """The message of the first failed stage of a shard's download -> quantize -> upload."""
    for future in chain:
        try:
            future.result()
        except Exception as e:  # the stage's own exception says what went wrong
            return str(e) or type(e).__name__
    return "failed"


def _delete_downloads(plan, finished, manifests: dict, paths: dict[str, str]) -> None:
    """Delete downloaded copies of `finished`'s source files that no pending shard needs.

    An HF-cache path is a link to a blob: both go.
    """
    pending = {f for s in plan.shards if s.name not in manifests for f in s.files}
    for f in set(finished.files) - pending:
        copy = Path(paths[f])
        if copy.is_symlink():
            copy.resolve().unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


def _table(summary: dict) -> None:
    """The per-shard table artifact for the Prefect UI."""
    create_table_artifact(
        key="quantize-shards",
        table=[
            {
                "shard": m["name"],
                "cached": m["cached"],
                "bytes_in": m.get("bytes_in", 0),
                "bytes_out": m["size"],
                "seconds": m.get("seconds", 0.0),
            }
            for m in summary["shards"]
        ],  # fmt: skip
        description=f"{summary['quantized']} quantized, {summary['cached']} cached",
    )


def run_quantize(max_workers: int = 1, **params) -> dict:
    """Run the flow with enough threads for every stage to overlap."""
    threads = 3 * max(1, max_workers) + params.get("max_downloaded", 2) + 2
    runner = ThreadPoolTaskRunner(max_workers=threads)
    return quantize_checkpoint.with_options(task_runner=runner)(max_workers=max_workers, **params)


def model_free_ptq(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    scheme=None,
    config=None,
    ignore: Iterable[str] = (),
    max_workers: int = 1,
    device=None,
    converter=None,
) -> dict:
    """Drop-in for llm-compressor's `model_free_ptq`: same arguments, runs `quantize-checkpoint`.

    `scheme` is a preset name (or QuantizationScheme), `config` a QuantizationConfig,
    a dict, or a YAML/JSON file. A list of devices uses the first one.
    """
    from tasks.errors import PtqflowError

    if converter is not None:
        raise PtqflowError("converters (pre-quantized sources) are not supported yet")
    if isinstance(device, (list, tuple)):
        device = device[0] if device else None
    if config is not None and not isinstance(config, (str, dict, os.PathLike)):
        config = config.model_dump()
    if scheme is not None and not isinstance(scheme, str):
        config = {"config_groups": {"config_group_0": scheme.model_dump()}}
        scheme = None
    return run_quantize(
        max_workers=max_workers,
        source=str(model_stub),
        destination=str(save_directory),
        scheme=scheme,
        config=str(config) if isinstance(config, os.PathLike) else config,
        ignore=list(ignore),
        device=None if device is None else str(device),
    )
