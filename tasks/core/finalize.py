"""Finish a run: copy the other files, then write the index, the model card and config.json,
last."""

from __future__ import annotations

import json
from functools import partial

from storage.dest import Dest
from storage.errors import PtqflowError
from storage.names import CONFIG, INDEX, PARTIAL, README
from storage.source import Folder
from tasks.core.card import CardRequest, card_text
from tasks.core.records import Manifest, Plan

__all__ = [
    "finalize",
    "write_card",
]


def _read(source: Folder, rel: str) -> bytes:
    with source.open(rel) as f:
        return f.read()


def finalize(
    plan: Plan,
    source: Folder,
    dest: Dest,
    manifests: list[Manifest],
    card: CardRequest | None = None,
) -> dict:
    """Make DEST a complete checkpoint; returns the index written.

    Every shard named by `manifests` must be in DEST with its recorded size.
    Shard files the plan does not name (left by an earlier run with another
    layout) and leftover partial files are removed before the index is written.
    `card` asks for the output's README.md (tasks/core/card.py); without it,
    or with kind "source", SOURCE's is copied like any other file.
    """
    for m in manifests:
        if dest.size(m.name) != m.size:
            raise PtqflowError(
                f"output shard {m.name} is missing or changed in {dest.url}; run again to redo it"
            )
    names = {s.name for s in plan.shards}
    stale = [
        entry
        for entry in dest.entries()
        if (entry.endswith(".safetensors") and entry not in names) or entry.endswith(PARTIAL)
    ]
    # other files are read when stored, one at a time: with --include-other-weights they can
    # be many GB
    own_card = card is not None and card.kind != "source"
    files: dict = {
        rel: partial(_read, source, rel)
        for rel in plan.other_files
        if not (own_card and rel == README)
    }
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": dict(sorted(plan.weight_map().items())),
    }
    files[INDEX] = json.dumps(index, indent=2).encode() + b"\n"
    model_config = json.loads(source.read_text(CONFIG))
    if plan.config is not None:
        model_config["quantization_config"] = plan.config
    elif plan.source_format is not None:  # dequantized
        model_config.pop("quantization_config", None)
    if plan.rotation is not None:  # what verify re-applies; the model runs without it
        plan.rotation.write_into(model_config)
    if own_card:
        files[README] = card_text(plan, source, dest.url, model_config, card).encode()
    files[CONFIG] = (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode()
    dest.commit(files, stale, shards=[m.name for m in manifests])
    return index


def write_card(plan: Plan, source: Folder, dest: Dest, card: CardRequest, verified) -> None:
    """Write DEST's model card again, with what verify found (`verified`, a VerifyResult):
    verify reads the finished checkpoint, so its result comes after finalize."""
    if card.kind != "card":
        return
    model_config = json.loads(dest.read(CONFIG))
    text = card_text(plan, source, dest.url, model_config, card, verified)
    dest.commit({README: text.encode()}, [])
