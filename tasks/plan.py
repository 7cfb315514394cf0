"""Stage 1, plan: which output shard gets which tensors (and, for reindex-fused-weights,
which shard each fused set moves to)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.source import open_source
from tasks.core.checkpoint import load_source
from tasks.core.planner import plan_checkpoint, reindex_plan
from tasks.core.records import Plan, PlanRequest, Report

# Plans made a moment before the flow started, by their requests' keys (see `planned`):
# taken by the plan task instead of reading every header again.
_MADE: dict[str, tuple[Plan, Report]] = {}


def plan(request: PlanRequest) -> tuple[Plan, Report]:
    """The plan of `request`: the one `planned` holds for it, or plan_checkpoint's (on a copy
    of its config, which planning adds ignores to, so the request stays as it was made)."""
    made = _MADE.get(request.key())
    if made is not None:
        return made
    return plan_checkpoint(request.source, request.config.model_copy(deep=True), **request.options)


@contextmanager
def planned(request: PlanRequest, made: tuple[Plan, Report]) -> Iterator[None]:
    """Within the block, `plan(request)` is `made`: the CLI plans for its checks before
    Prefect starts, and the flow's plan task, given an equal request, then does not read
    every header again (from the Hub, a request per shard). Other requests plan afresh."""
    _MADE[request.key()] = made
    try:
        yield
    finally:
        _MADE.clear()


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(request: PlanRequest) -> Plan:
    """Plan quantize-checkpoint from SOURCE's headers; the run's log gets the plan's notes
    (what was asked for) at INFO, its callouts (what was not) as warnings."""
    made, report = plan(request)
    logger = get_run_logger()
    for line in report.notes:
        logger.info(line)
    for line in report.callouts:
        logger.warning(line)
    return made


@task(name="plan-reindex", cache_policy=NO_CACHE)
def reindex_plan_task(source: str, revision: str | None = None) -> Plan:
    """Plan a copy of SOURCE with every fused set in one shard, nothing quantized."""
    return reindex_plan(load_source(open_source(source, revision)))
