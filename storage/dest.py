"""The destination folder: who owns it, and writes that only ever show complete files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.errors import PtqflowError

MARKER = ".ptqflow/dest.json"
DERIVED = ("config.json", "model.safetensors.index.json")


def check_dest(dest: str | os.PathLike, source: str, overwrite: bool = False) -> None:
    """Refuse a DEST that is not ours to write, without touching anything.

    DEST must be new, empty, or an earlier ptqflow output of the same source
    (a rerun resumes into it); `overwrite` allows any other DEST except one
    that is, holds or lies inside a local SOURCE.
    """
    dest = Path(dest).resolve()
    if dest.exists() and not dest.is_dir():
        raise PtqflowError(f"destination {dest} exists and is not a folder")
    if "://" not in source:
        src = Path(source).resolve()
        if src == dest or src in dest.parents or dest in src.parents:
            raise PtqflowError(
                f"destination {dest} and source {src} overlap; write to a separate folder"
            )
    if overwrite or not dest.exists() or not any(dest.iterdir()):
        return
    marker = dest / MARKER
    owner = json.loads(marker.read_text()).get("source") if marker.exists() else None
    if owner != source:
        found = ", ".join(sorted(p.name for p in dest.iterdir())[:5])
        whose = f"ptqflow output of {owner}" if owner else "files ptqflow did not write"
        raise PtqflowError(
            f"destination {dest} already holds {whose} ({found}). "
            "Choose a new folder, or pass --overwrite to delete what is there."
        )


def prepare_dest(dest: str | os.PathLike, source: str, overwrite: bool = False) -> Path:
    """Make DEST ready for a run from `source` (see `check_dest`).

    Its config.json and index are removed first, so it never looks like a
    finished checkpoint while the run is under way.
    """
    check_dest(dest, source, overwrite)
    dest = Path(dest)
    if overwrite and dest.exists():
        shutil.rmtree(dest)
    marker = dest / MARKER
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
