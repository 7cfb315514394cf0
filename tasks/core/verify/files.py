"""Local copies of the files verify reads, downloaded once whichever shard check asks."""

from __future__ import annotations

import threading
from pathlib import Path

from storage.source import Folder

__all__ = [
    "LocalFiles",
]


class LocalFiles:
    """Local paths of SOURCE and QUANTIZED files, each downloaded once (remote ones into
    `cache_dir`, Hub ones into the Hugging Face cache), whichever thread asks first."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.lock = threading.Lock()
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        self.paths: dict[tuple[str, str], str] = {}

    def path(self, folder: Folder, rel: str) -> str:
        key = (folder.url, rel)
        with self.lock:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.paths:
                cache = self.cache_dir
                if cache is None and not folder.is_local and not folder.is_hub:
                    from storage.dest import default_state_dir

                    cache = default_state_dir() / "downloads"
                self.paths[key] = str(folder.download(rel, cache))
        return self.paths[key]

    def folder(self, folder: Folder, files: list[str], root: Path) -> str:
        """A local folder with `files`: the folder itself when local, else `root` with
        links to the downloaded copies."""
        if folder.is_local:
            return folder.root
        root.mkdir(parents=True)
        for rel in files:
            (root / rel).symlink_to(self.path(folder, rel))
        return str(root)
