"""The destination folder: who owns it, and writes that only ever show complete files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.errors import PtqflowError

MARKER = ".ptqflow/dest.json"
DERIVED = ("config.json", "model.safetensors.index.json")


def prepare_dest(dest: str | os.PathLike, source: str, overwrite: bool = False) -> Path:
    """Make DEST ready for a run from `source`.

    DEST must be new, empty, or an earlier ptqflow output of the same source
    (a rerun resumes into it). Its config.json and index are removed first, so
    it never looks like a finished checkpoint while the run is under way.
    """
    dest = Path(dest)
    marker = dest / MARKER
    if dest.exists() and not dest.is_dir():
        raise PtqflowError(f"destination {dest} exists and is not a folder")
    if overwrite and dest.exists():
        shutil.rmtree(dest)
    if dest.exists() and any(dest.iterdir()):
        owner = json.loads(marker.read_text()).get("source") if marker.exists() else None
        if owner != source:
            found = ", ".join(sorted(p.name for p in dest.iterdir())[:5])
            whose = f"ptqflow output of {owner}" if owner else "files ptqflow did not write"
            raise PtqflowError(
                f"destination {dest} already holds {whose} ({found}). "
                "Choose a new folder, or pass --overwrite to delete what is there."
            )
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({"source": source}).encode())
    for name in DERIVED:
        (dest / name).unlink(missing_ok=True)
    return dest


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
