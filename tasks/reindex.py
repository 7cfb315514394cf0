"""The reindex-fused-weights stage as a Prefect task; the planning itself is tasks/planner.py."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.plan import Plan
from tasks.planner import plan_checkpoint


@task(name="reindex-fused-weights", cache_policy=NO_CACHE)
def plan_task(
    source: str, config, include_other_weights: bool = False, revision: str | None = None,
    source_format: str | None = None, keep_source_quantization: bool = False,
) -> Plan:  # fmt: skip
    """The planning stage of quantize-checkpoint: which shard gets which tensors."""
    from prefect import get_run_logger

    plan, report = plan_checkpoint(
        source, config, include_other_weights=include_other_weights, revision=revision,
        source_format=source_format, keep_source_quantization=keep_source_quantization,
    )  # fmt: skip
    for line in report.callouts:
        get_run_logger().warning(line)
    return plan
