"""Finish a run: copy the other files, then write the index and config.json, last."""

from __future__ import annotations

import json
from functools import partial

from storage.dest import Dest
from storage.errors import PtqflowError
from storage.names import CONFIG, INDEX, PARTIAL
from storage.source import Folder
from tasks.core.records import Manifest, Plan

__all__ = [
    "finalize",
]


def _read(source: Folder, rel: str) -> bytes:
    with source.open(rel) as f:
        return f.read()


def finalize(plan: Plan, source: Folder, dest: Dest, manifests: list[Manifest]) -> dict:
    """Make DEST a complete checkpoint; returns the index written.

    Every shard named by `manifests` must be in DEST with its recorded size.
    Shard files the plan does not name (left by an earlier run with another
    layout) and leftover partial files are removed before the index is written.
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
    files: dict = {rel: partial(_read, source, rel) for rel in plan.other_files}
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
    files[CONFIG] = (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode()
    dest.commit(files, stale, shards=[m.name for m in manifests])
    return index
