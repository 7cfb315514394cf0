"""The `quantize-checkpoint` flow and llm-compressor's `model_free_ptq` entry point.

The flow only wires tasks. Per shard: download -> quantize -> upload, after
the reindex-fused-weights planning task and before finalize. Shards overlap
(shard k quantizes while k+1 downloads and k-1 uploads) on threads or Dask
workers; a per-device concurrency limit bounds quantizing shards and a window
of `max_downloaded` the shards downloaded but not yet quantized. The upload
result is cached under a content key, so a rerun skips every shard whose
output is still in DEST.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from storage.dest import Dest
from storage.results import result_store, shard_key, still_valid, stored_manifest
from storage.source import Folder
from tasks.dequantize import FORMATS
from tasks.download import cache_dir_for, download_task
from tasks.errors import PtqflowError
from tasks.finalize import finalize_task
from tasks.quantize import quantize_task
from tasks.reindex import plan_task
from tasks.schemes import resolve_config
from tasks.upload import upload_task
from tasks.verify import verify_task


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


TaskRunnerName = Literal["threads", "dask"]
SourceFormatName = Literal[FORMATS]


@flow(name="quantize-checkpoint")
def quantize_checkpoint(
    source: Annotated[str, Field(description="folder, Hub repo id (org/name) or fsspec URL")],
    destination: Annotated[str, Field(description="folder, hf://org/name or fsspec URL")],
    scheme: Annotated[str | None, Field(description="compressed-tensors preset")] = None,
    config: Annotated[
        str | dict | None, Field(description="QuantizationConfig, or a YAML/JSON file")
    ] = None,
    ignore: Annotated[list[str] | None, Field(description="module names or re: regexes")] = None,
    max_workers: Annotated[int, Field(ge=1, description="shards quantizing at once")] = 1,
    device: Annotated[str | None, Field(description="cpu, cuda:0, or cuda:0,cuda:1")] = None,
    overwrite: bool = False,
    include_other_weights: bool = False,
    cache_dir: str | None = None,
    result_storage: str | None = None,
    max_downloaded: Annotated[int, Field(ge=1, description="downloaded, unquantized shards")] = 2,
    delete_source: bool = False,
    revision: str | None = None,
    private: bool = False,
    task_runner: TaskRunnerName = "threads",
    dask_address: Annotated[str | None, Field(description="tcp://scheduler:8786")] = None,
    verify: Annotated[bool, Field(description="check DEST as verify-checkpoint does")] = False,
    source_format: Annotated[
        SourceFormatName, Field(description="how SOURCE stores its weights (auto: config.json)")
    ] = "auto",
    keep_source_quantization_for_ignored: Annotated[
        bool, Field(description="ignored layers keep a pre-quantized SOURCE's quantization")
    ] = False,
) -> dict:
    """Quantize SOURCE into DESTINATION with a preset `scheme` or a QuantizationConfig.

    SOURCE is a folder, a Hub repo id (at `revision`) or an fsspec URL;
    DESTINATION a folder, `hf://org/name` (created, `private` if asked) or an fsspec URL.
    A pre-quantized SOURCE (FP8 block, compressed-tensors, ModelOpt NVFP4, AutoAWQ)
    is dequantized weight by weight on the way; a config without groups only dequantizes.
    """
    logger = get_run_logger()
    started = time.monotonic()
    qconfig = resolve_config(scheme, config, ignore or [])
    plan = plan_task(source, qconfig, include_other_weights, revision, source_format,
                     keep_source_quantization_for_ignored)  # fmt: skip
    dest = Dest(destination, private=private)
    dest.prepare(plan.source, overwrite)
    store = result_store(dest, result_storage)
    remote = not Folder(plan.source).is_local
    cache = cache_dir_for(Folder(plan.source), cache_dir)
    devices = (device or default_device()).split(",")
    upload = upload_task.with_options(result_storage=store)
    redo = upload.with_options(refresh_cache=True)
    futures, chains, cached, window = {}, {}, set(), []
    with make_runner(task_runner, max_workers, max_downloaded, dask_address) as runner, \
            device_limits(devices, max_workers) as limits:  # fmt: skip
        for i, shard in enumerate(plan.shards):
            key = shard_key(plan, shard, dest.url)
            manifest = stored_manifest(store, key)
            if manifest is not None and still_valid(manifest, dest):
                futures[submit(runner, upload, shard, manifest=None, dest=dest, key=key)] = shard
                cached.add(shard.name)
                continue
            if len(window) >= max_downloaded:  # bounds shards downloaded but not quantized
                window.pop(0).wait()
            dev = devices[i % len(devices)]
            paths = submit(runner, download_task, shard, source=plan.source, files=shard.files,
                           cache_dir=cache)  # fmt: skip
            q = submit(runner, quantize_task, shard, shard=shard, paths=paths, config=qconfig,
                       out_dir=str(dest.staging), device=dev, limit=limits[dev])  # fmt: skip
            window.append(q)
            futures[submit(runner, redo, shard, manifest=q, dest=dest, key=key)] = shard
            chains[shard.name] = (paths, q)
        if cached:
            logger.info("%d of %d shards already done (cached)", len(cached), len(plan.shards))
        manifests, failed = _collect(plan, futures, chains, cached, delete_source and remote)
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
    if verify:  # raises naming every failing tensor
        summary["verify"] = verify_task(plan.source, dest.url, max_workers=max_workers,
                                        device=devices[0], cache_dir=cache)  # fmt: skip
    return summary


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
            failed[shard.name] = _failure(chains.get(shard.name, ()) + (future,))
            logger.error("%s failed: %s", shard.name, failed[shard.name])
            continue
        manifests[shard.name] = {**manifest, "cached": shard.name in cached}
        if shard.name not in cached:
            done_bytes += shard.bytes_in
            if delete_downloads:
                _delete_downloads(plan, shard, manifests, chains[shard.name][0].result())
        elapsed = time.monotonic() - t0
        rate = done_bytes / elapsed if elapsed else 0.0
        eta = (todo_bytes - done_bytes) / rate if rate else 0.0
        logger.info(
            "[%d/%d] %s %s  %.2f GB read, %.3f GB/s, ETA %.0f s",
            len(manifests) + len(failed), len(plan.shards), shard.name,
            "cached" if shard.name in cached else "done", done_bytes / 1e9, rate / 1e9, eta,
        )  # fmt: skip
        update_progress_artifact(progress, 100.0 * len(manifests) / len(plan.shards))
    return manifests, failed


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


@contextmanager
def device_limits(devices: list[str], max_workers: int):
    """One Prefect global concurrency limit per device, private to this flow run:
    a GPU takes one shard at a time, the CPU `max_workers`. Named by run, so a
    killed run's leftover slots never block the next one."""
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    run_id = get_run_context().flow_run.id
    limits = {d: f"ptqflow-{run_id}-{d.replace(':', '')}" for d in devices}
    with get_client(sync_client=True) as client:
        for dev, name in limits.items():
            limit = 1 if dev.startswith("cuda") else max_workers
            client.upsert_global_concurrency_limit_by_name(name, limit)
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


def run_quantize(**params) -> dict:
    """Run the flow (kept as the one place callers go through)."""
    return quantize_checkpoint(**params)


# compressed-tensors converters that llm-compressor's model_free_ptq accepts, as source formats
CONVERTER_FORMATS = {"FP8BlockDequantizer": "fp8-block", "AutoAWQConverter": "awq",
                     "CompressedTensorsDequantizer": "compressed-tensors",
                     "ModelOptNvfp4Converter": "modelopt-nvfp4"}  # fmt: skip


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
    a dict, or a YAML/JSON file. A list of devices uses the first one. A
    `converter` of compressed-tensors (FP8BlockDequantizer, ...) names the
    source's format; its settings come from SOURCE's config.json, as ptqflow
    detects pre-quantized sources by itself.
    """
    source_format = "auto"
    if converter is not None:
        source_format = CONVERTER_FORMATS.get(type(converter).__name__)
        if source_format is None:
            raise PtqflowError(
                f"converter {type(converter).__name__} is not supported; ptqflow dequantizes "
                f"the sources of {', '.join(CONVERTER_FORMATS)} itself (detected from config.json)"
            )
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
        source_format=source_format,
    )
