"""Checkpoint folders addressed by a local path, a Hub repo id or any fsspec URL.

Hub repos are read through huggingface_hub's own fsspec filesystem (`hf://`)
for headers and listings, and downloaded with `hf_hub_download` (resumable,
into the Hugging Face cache or `--cache-dir`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import PtqflowError, disk_full_is
from storage.names import partial_path


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

    @property
    def is_hub(self) -> bool:
        protocol = self.fs.protocol
        return "hf" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def hub_path(self, rel: str = ""):
        """(repo_id, revision, path in repo) of a Hub file."""
        resolved = self.fs.resolve_path(self.path(rel) if rel else self.root)
        return resolved.repo_id, resolved.revision, resolved.path_in_repo

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

    def open(self, rel: str, mode: str = "rb", **kwargs) -> BinaryIO:
        return self.fs.open(self.path(rel), mode, **kwargs)

    def open_unbuffered(self, rel: str) -> BinaryIO:
        """For a few small reads (headers): each read fetches exactly what it asks for,
        where a remote filesystem would otherwise fetch whole blocks."""
        return self.open(rel) if self.is_local else self.open(rel, cache_type="none")

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_text(self, rel: str) -> str:
        with self.open(rel, "rb") as f:
            return f.read().decode()

    def fingerprint(self, rel: str) -> str:
        """What identifies this version of a file: a checksum or ETag if the store has
        one, else size and modification time."""
        info = self.fs.info(self.path(rel))
        lfs = info.get("lfs") or {}
        if lfs.get("sha256") or info.get("blob_id"):
            return f"hub:{lfs.get('sha256') or info['blob_id']}:{info.get('size')}"
        for key in ("sha256", "ETag", "etag", "md5", "checksum"):
            if info.get(key):
                return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        return f"size:{info.get('size')}:mtime:{stamp}"

    def download(self, rel: str, cache_dir: Path | None, chunk: int = 1 << 24) -> Path:
        """A local copy of `rel` (the file itself when the folder is local).

        Hub files go through `hf_hub_download` (into the HF cache unless
        `cache_dir` is given). Other remote files are copied into `cache_dir`
        under a name derived from their fingerprint; an interrupted copy
        resumes from where it stopped.
        """
        if self.is_local:
            return Path(self.path(rel))
        if self.is_hub:
            from huggingface_hub import hf_hub_download

            repo_id, revision, path = self.hub_path(rel)
            return Path(hf_hub_download(repo_id, path, revision=revision, cache_dir=cache_dir))
        if cache_dir is None:
            raise ValueError("a cache_dir is needed to download from " + self.url)
        digest = hashlib.sha256(f"{self.url}\0{rel}\0{self.fingerprint(rel)}".encode())
        target = cache_dir / digest.hexdigest()[:24] / rel
        size = self.size(rel)
        if target.exists() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        done = partial.stat().st_size if partial.exists() else 0
        if done > size:
            partial.unlink()
            done = 0
        full = (
            f"disk full while downloading {rel} into {cache_dir}; "
            "free space (or use --cache-dir elsewhere) and run again to resume"
        )
        with disk_full_is(full), self.open(rel) as src, open(partial, "ab") as out:
            src.seek(done)
            while block := src.read(min(chunk, size - done)):
                out.write(block)
                done += len(block)
        if done != size:
            raise OSError(f"{self.path(rel)}: got {done} of {size} bytes")
        partial.replace(target)
        return target


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def open_source(spec: str, revision: str | None = None) -> Folder:
    """SOURCE as a Folder: a local path, any fsspec URL, or a Hub repo id (`org/name`).

    A Hub source is pinned to the commit its revision points at now, so every
    shard of a run (and of a resumed run) comes from the same commit.
    """
    if "://" not in spec and not os.path.exists(spec):
        if not HUB_ID.fullmatch(spec):
            raise PtqflowError(f"source {spec} does not exist (and is not a Hub repo id org/name)")
        spec = f"hf://{spec}"
    if revision is not None and not spec.startswith("hf://"):
        raise PtqflowError("--revision applies to Hub sources only")
    if not spec.startswith("hf://"):
        return Folder(spec)
    from huggingface_hub import HfApi

    repo_id, _, at = spec[len("hf://") :].partition("@")
    with hub_errors(f"Hub repo {repo_id}"):
        sha = HfApi().repo_info(repo_id, revision=revision or at or None).sha
    return Folder(f"hf://{repo_id}@{sha}")


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn the Hub's answers and the network's failures into one message naming `what`."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PtqflowError(
            f"cannot open {what}: HF_HUB_OFFLINE is set, so the Hub is not asked. Unset it, "
            "or give a local folder (a snapshot in the HF cache works)"
        ) from None
    except HfHubHTTPError as e:
        raise PtqflowError(f"cannot open {what}: {e}") from None
    except Exception as e:  # the network itself: name resolution, refused connections, timeouts
        if not any(k in type(e).__name__ for k in ("Connect", "Timeout", "Network", "Transport")):
            raise
        raise PtqflowError(
            f"cannot reach the Hugging Face Hub for {what} ({type(e).__name__}: {e}); "
            "check the network (and HF_ENDPOINT), or give a local folder"
        ) from None
