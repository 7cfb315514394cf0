"""Stage 1, plan (`reindex-fused-weights`): which output shard gets which tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.source import open_source
from tasks.core.checkpoint import load_source
from tasks.core.planner import Report, plan_checkpoint, reindex_plan
from tasks.core.records import Plan

# Plans made a moment before the flow started, under the arguments they were made from
# (see `planned`): taken by the plan task instead of reading every header again.
_MADE: dict[str, tuple[Plan, Report]] = {}


def _key(args: tuple) -> str:
    return json.dumps(args, default=lambda c: c.model_dump(mode="json"), sort_keys=True)


def plan(*args) -> tuple[Plan, Report]:
    """plan_checkpoint(source, config, include_other_weights, revision, source_format,
    keep_source_quantization, source_settings, rotate), or the plan `planned` holds for them."""
    made = _MADE.get(_key(args))
    if made is not None:
        return made
    source, config, include, revision, fmt, keep, settings, rotate = args
    return plan_checkpoint(
        source,
        config,
        include_other_weights=include,
        revision=revision,
        source_format=fmt,
        keep_source_quantization=keep,
        source_settings=settings,
        rotate=rotate,
    )


@contextmanager
def planned(made: tuple[Plan, Report], *args) -> Iterator[None]:
    """Within the block, `plan(*args)` is `made`: the CLI plans for its checks before
    Prefect starts, and the flow's plan task then does not read every header again
    (from the Hub, a request per shard). Other arguments plan afresh."""
    _MADE[_key(args)] = made
    try:
        yield
    finally:
        _MADE.clear()


@task(name="reindex-fused-weights", cache_policy=NO_CACHE)
def plan_task(
    source: str,
    config,
    include_other_weights: bool = False,
    revision: str | None = None,
    source_format: str | None = None,
    keep_source_quantization: bool = False,
    source_settings: dict | None = None,
    rotate: str | None = None,
) -> Plan:
    """Plan quantize-checkpoint from SOURCE's headers; the plan's callouts go to the run's log."""
    made, report = plan(
        source,
        config,
        include_other_weights,
        revision,
        source_format,
        keep_source_quantization,
        source_settings,
        rotate,
    )
    for line in report.callouts:
        get_run_logger().warning(line)
    return made


@task(name="plan-reindex", cache_policy=NO_CACHE)
def reindex_plan_task(source: str, revision: str | None = None) -> Plan:
    """Plan a copy of SOURCE with every fused set in one shard, nothing quantized."""
    return reindex_plan(load_source(open_source(source, revision)))
