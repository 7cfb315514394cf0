"""Stage 5, finalize: copy the other files, then write the index, the model card and
config.json, last; after --verify, the card again with its result."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.dest import Dest
from storage.source import Folder
from tasks.core.card import CardRequest
from tasks.core.finalize import finalize, write_card
from tasks.core.records import Manifest, Plan


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(
    plan: Plan,
    source: str,
    dest: Dest,
    manifests: list[Manifest],
    card: CardRequest | None = None,
) -> dict:
    return finalize(plan, Folder(source), dest, manifests, card)


@task(name="model-card", cache_policy=NO_CACHE)
def card_task(plan: Plan, source: str, dest: Dest, card: CardRequest, verified) -> None:
    """The model card again, with what verify found."""
    write_card(plan, Folder(source), dest, card, verified)
