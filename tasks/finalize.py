"""Stage 5, finalize: copy the other files, then write the index and config.json, last."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.dest import Dest
from storage.source import Folder
from tasks.core.finalize import finalize
from tasks.core.records import Manifest, Plan


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(plan: Plan, source: str, dest: Dest, manifests: list[Manifest]) -> dict:
    return finalize(plan, Folder(source), dest, manifests)
