"""Finish a run: copy the other files, then write the index and config.json, last."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from storage.dest import write_atomic
from storage.source import Folder
from tasks.errors import PtqflowError
from tasks.plan import Plan

INDEX = "model.safetensors.index.json"


def finalize(plan: Plan, source: Folder, dest: Path, manifests: list[dict]) -> dict:
    """Make DEST a complete checkpoint; returns the index written.

    Every shard named by `manifests` must exist with its recorded size. Shard
    files that the plan does not name (left by an earlier run with another
    layout) are removed before the index is written.
    """
    for m in manifests:
        path = dest / m["name"]
        if not path.exists() or path.stat().st_size != m["size"]:
            raise PtqflowError(f"output shard {path} is missing or changed; run again to redo it")
    names = {s.name for s in plan.shards}
    for stale in dest.glob("*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    for rel in plan.other_files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        with source.open(rel) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
        tmp.replace(target)
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": dict(sorted(plan.weight_map().items())),
    }
    write_atomic(dest / INDEX, json.dumps(index, indent=2).encode() + b"\n")
    model_config = json.loads(source.read_text("config.json"))
    if plan.config is not None:
        model_config["quantization_config"] = plan.config
    text = json.dumps(model_config, indent=2, sort_keys=True) + "\n"
    write_atomic(dest / "config.json", text.encode())
    return index
