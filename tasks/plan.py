"""Stage 1, plan (`reindex-fused-weights`): which output shard gets which tensors."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.source import open_source
from tasks.core.checkpoint import load_source
from tasks.core.planner import plan_checkpoint, reindex_plan
from tasks.core.records import Plan


@task(name="reindex-fused-weights", cache_policy=NO_CACHE)
def plan_task(
    source: str,
    config,
    include_other_weights: bool = False,
    revision: str | None = None,
    source_format: str | None = None,
    keep_source_quantization: bool = False,
    source_settings: dict | None = None,
) -> Plan:
    """Plan quantize-checkpoint from SOURCE's headers; the plan's callouts go to the run's log."""
    plan, report = plan_checkpoint(
        source,
        config,
        include_other_weights=include_other_weights,
        revision=revision,
        source_format=source_format,
        keep_source_quantization=keep_source_quantization,
        source_settings=source_settings,
    )
    for line in report.callouts:
        get_run_logger().warning(line)
    return plan


@task(name="plan-reindex", cache_policy=NO_CACHE)
def reindex_plan_task(source: str, revision: str | None = None) -> Plan:
    """Plan a copy of SOURCE with every fused set in one shard, nothing quantized."""
    return reindex_plan(load_source(open_source(source, revision)))
