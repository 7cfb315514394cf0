"""Checkpoint folders addressed by a local path or any fsspec URL."""

from __future__ import annotations

import errno
import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
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

    def fingerprint(self, rel: str) -> str:
        """What identifies this version of a file: a checksum or ETag if the store has
        one, else size and modification time."""
        info = self.fs.info(self.path(rel))
        for key in ("sha256", "ETag", "etag", "md5", "checksum"):
            if info.get(key):
                return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        return f"size:{info.get('size')}:mtime:{stamp}"

    def download(self, rel: str, cache_dir: Path, chunk: int = 1 << 24) -> Path:
        """A local copy of `rel` (the file itself when the folder is local).

        Remote files are copied into `cache_dir` under a name derived from
        their fingerprint; an interrupted copy resumes from where it stopped.
        """
        if self.is_local:
            return Path(self.path(rel))
        digest = hashlib.sha256(f"{self.url}\0{rel}\0{self.fingerprint(rel)}".encode())
        target = cache_dir / digest.hexdigest()[:24] / rel
        size = self.size(rel)
        if target.exists() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        done = partial.stat().st_size if partial.exists() else 0
        if done > size:
            partial.unlink()
            done = 0
        try:
            with self.open(rel) as src, open(partial, "ab") as out:
                src.seek(done)
                while block := src.read(min(chunk, size - done)):
                    out.write(block)
                    done += len(block)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise PtqflowError(
                    f"disk full while downloading {rel} into {cache_dir}; "
                    "free space (or use --cache-dir elsewhere) and run again to resume"
                ) from None
            raise
        if done != size:
            raise OSError(f"{self.path(rel)}: got {done} of {size} bytes")
        partial.replace(target)
        return target
