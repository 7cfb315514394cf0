"""The `quantize-checkpoint` flow and llm-compressor's `model_free_ptq` entry point.

The flow only wires tasks: plan (reindex-fused-weights) -> one quantize task
per output shard -> finalize. Plans and manifests pass between tasks; tensors
never do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from storage.dest import prepare_dest
from storage.source import Folder
from tasks.finalize import finalize
from tasks.quantize import write_shard
from tasks.reindex import plan_checkpoint
from tasks.schemes import resolve_config


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@task(name="reindex-fused-weights", cache_policy=NO_CACHE)
def plan_task(source: str, config, include_other_weights: bool):
    plan, report = plan_checkpoint(source, config, include_other_weights=include_other_weights)
    logger = get_run_logger()
    for line in report.callouts:
        logger.warning(line)
    return plan


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(shard, source: str, dest: Path, config, device: str) -> dict:
    manifest = write_shard(shard, Folder(source), dest, config.config_groups, device)
    get_run_logger().info("%s: %d bytes written", shard.name, manifest["size"])
    return manifest


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(plan, source: str, dest: Path, manifests: list[dict]) -> dict:
    return finalize(plan, Folder(source), dest, manifests)


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
) -> dict:
    """Quantize SOURCE into DESTINATION with a preset `scheme` or a QuantizationConfig."""
    qconfig = resolve_config(scheme, config, ignore or [])
    plan = plan_task(source, qconfig, include_other_weights)
    dest = prepare_dest(destination, plan.source, overwrite)
    device = device or default_device()
    futures = [quantize_task.submit(s, plan.source, dest, qconfig, device) for s in plan.shards]
    manifests = [f.result() for f in futures]
    finalize_task(plan, plan.source, dest, manifests)
    return {"destination": str(dest), "shards": manifests, "total_size": plan.total_size}


def run_quantize(max_workers: int = 1, **params) -> dict:
    """Run the flow with a thread pool of `max_workers` shards in parallel."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, max_workers))
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
