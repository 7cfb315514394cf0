"""Checkpoint folders addressed by a local path or any fsspec URL."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import PtqflowError


@dataclass
class Folder:
    """A folder on some fsspec filesystem; paths given to its methods are relative."""

    url: str

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        if self.is_local:
            # one spelling per folder, so reruns recognise their source
            self.url = self.root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def files(self) -> list[str]:
        """Every file below the folder, as sorted relative paths."""
        if not self.fs.isdir(self.root):
            raise PtqflowError(f"{self.url} is not a folder")
        found = self.fs.find(self.root)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        return self.fs.open(self.path(rel), mode)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_text(self, rel: str) -> str:
        with self.open(rel, "rb") as f:
            return f.read().decode()
