"""The destination: a local folder, a Hub repo or any fsspec URL, and who owns it.

Shards are written locally (into DEST itself when it is local, else into a
staging folder) and then stored under their final name; DEST only looks like
a checkpoint once `config.json` and the index are written, last.

`open_dest` gives the kind of Dest a URL names. `Dest` itself writes any fsspec
filesystem; `LocalDest` writes a folder in place, with renames; `HubDest` uploads
to a Hub repo's LFS store and commits everything at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from storage.direct import file_digest, stream_digest
from storage.errors import PtqflowError
from storage.lease import Lease
from storage.names import CONFIG, INDEX, partial_path
from storage.source import Folder, hub_errors

MARKER = ".ptqflow/dest.json"
LEASE = ".ptqflow/lease.json"  # in the staging folder: DEST itself when local
# in the staging folder: shards uploaded to a Hub DEST's LFS store, not yet committed
PENDING = ".ptqflow/pending"
DERIVED = (CONFIG, INDEX)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, then rename it into place."""
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_state_dir() -> Path:
    """Where ptqflow keeps downloads, staging and results: `$PREFECT_HOME/ptqflow`.

    PREFECT_HOME is read from the environment, with Prefect's default, so this
    layer needs no Prefect.
    """
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / "ptqflow"


def _check_creatable(path: Path) -> None:
    """Raise naming `path` if files cannot be made in it or in its nearest existing parent."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PtqflowError(f"destination {path} cannot be created: {existing} is not a folder")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".ptqflow-probe-").cleanup()
    except OSError as e:
        raise PtqflowError(
            f"destination {path} cannot be created in {existing} ({e.strerror}); "
            "choose a folder you can write to"
        ) from None


class Dest:
    """DEST on an fsspec filesystem: where finished shards, other files, the index and
    config.json go. Shards are staged in a local folder, then put in DEST."""

    def __init__(self, url: str | os.PathLike, staging: str | os.PathLike | None = None):
        self.folder = Folder(str(url))
        self.url = self.folder.url
        self._lease: Lease | None = None
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.staging = Path(staging or default_state_dir() / "staging" / digest)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __getstate__(self) -> dict:
        """A Dest travels to Dask workers; its lease stays with the run that holds it."""
        return {**self.__dict__, "_lease": None}

    def lease(self) -> Lease:
        """The lease a run holds while it writes DEST (use as a context manager). For a
        remote DEST it lives in the local staging folder, so it keeps out runs on this
        machine (which would share that folder)."""
        if self._lease is None:
            self._lease = Lease(self.staging / LEASE, f"destination {self.url}")
        return self._lease

    def path(self, rel: str) -> str:
        return self.folder.path(rel)

    def exists(self, rel: str) -> bool:
        return self.folder.fs.exists(self.path(rel))

    def size(self, rel: str) -> int | None:
        info = self.info(rel)
        return None if info is None else info["size"]

    def entries(self) -> list[str]:
        """Names directly inside DEST (empty if it does not exist)."""
        fs = self.folder.fs
        if not fs.exists(self.folder.root):
            return []
        listing = fs.ls(self.folder.root, detail=False)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing)

    def check(self, source: str, overwrite: bool = False) -> None:
        """Refuse a DEST that is not ours to write, changing nothing in it.

        DEST must be new, empty, or an earlier ptqflow output of the same source
        (a rerun resumes into it); `overwrite` allows any other DEST except one
        that is, holds or lies inside a local SOURCE. A local DEST must be
        creatable: an empty folder is made and removed where it would go.
        """
        fs = self.folder.fs
        if fs.exists(self.folder.root) and not fs.isdir(self.folder.root):
            raise PtqflowError(f"destination {self.url} exists and is not a folder")
        src = Folder(source)
        self._check_place(src)
        self.lease().check()
        entries = self.entries()
        if overwrite or not [e for e in entries if e != ".ptqflow"]:  # ptqflow's own state
            return
        owner = json.loads(self.read(MARKER)).get("source") if self.exists(MARKER) else None
        if owner != src.url:
            found = ", ".join(entries[:5])
            whose = f"ptqflow output of {owner}" if owner else "files ptqflow did not write"
            raise PtqflowError(
                f"destination {self.url} already holds {whose} ({found}). "
                "Choose a new folder, or pass --overwrite to delete what is there."
            )

    def _check_place(self, source: Folder) -> None:
        """Refuse, before any work, a DEST that cannot be written where it is."""

    @contextlib.contextmanager
    def writing(self, source: str, overwrite: bool = False) -> Iterator[Dest]:
        """Hold DEST's lease, so no other run writes it, and `prepare` it for `source`."""
        with self.lease():
            self.prepare(source, overwrite)
            yield self

    def prepare(self, source: str, overwrite: bool = False) -> None:
        """Make DEST ready for a run from `source` (see `check`).

        Its config.json and index are removed first, so it never looks like a
        finished checkpoint while the run is under way.
        """
        self.check(source, overwrite)
        self._create()
        if overwrite and self.folder.fs.exists(self.folder.root):
            self._clear()
        marker = json.dumps({"source": Folder(source).url}).encode()
        ours = self.exists(MARKER) and self.read(MARKER).encode() == marker
        self.commit({} if ours else {MARKER: marker}, [d for d in DERIVED if self.exists(d)])
        self.staging.mkdir(parents=True, exist_ok=True)

    def _create(self) -> None:
        """Make DEST exist where a folder is not made by writing into it."""

    def _clear(self) -> None:
        """Delete what DEST holds (--overwrite)."""
        self.folder.fs.rm(self.folder.root, recursive=True)

    def read(self, rel: str) -> str:
        return self.folder.read_text(rel)

    def write(self, rel: str, data: bytes) -> None:
        """Store `data` as `rel` (one put)."""
        self.folder.fs.pipe_file(self.path(rel), data)

    def put(self, local: Path, rel: str) -> str:
        """Store the finished local file `local` as `rel`; returns its digest
        ("ALGORITHM:HEX", see `digest_algorithm`)."""
        digest = file_digest(local, self.digest_algorithm)
        self.folder.fs.put_file(str(local), self.path(rel))
        local.unlink()
        return digest

    def commit(
        self,
        files: dict[str, bytes | Callable[[], bytes]],
        remove: list[str],
        shards: list[str] = (),
    ) -> None:
        """Remove `remove`, then store `files` in their order (config.json last); a file given
        as a function is read when it is stored, so only one is in memory at a time.
        `shards` are those put since the last commit (a HubDest commits them)."""
        for rel in remove:
            self.remove(rel)
        for rel, data in files.items():
            self.write(rel, _content(data))

    def info(self, rel: str) -> dict | None:
        """Size and a cheap change stamp (mtime, ETag, or an LFS file's sha256) of `rel`,
        or None if absent."""
        try:
            info = self.folder.fs.info(self.path(rel))
        except FileNotFoundError:
            return None
        lfs = info.get("lfs") or {}
        stamp = (
            lfs.get("sha256")
            or info.get("blob_id")
            or info.get("ETag")
            or info.get("etag")
            or info.get("mtime")
            or info.get("created")
        )
        return {"size": int(info["size"]), "stamp": str(stamp)}

    @property
    def digest_algorithm(self) -> str:
        """What a shard's record is hashed with."""
        return "sha256"

    def digest(self, rel: str, algorithm: str) -> str:
        """ "ALGORITHM:HEX" of the file `rel` in DEST."""
        with self.folder.open(rel) as f:
            return stream_digest(f, algorithm)

    def remove(self, rel: str) -> None:
        fs = self.folder.fs
        if fs.exists(self.path(rel)):
            fs.rm(self.path(rel))  # rm_file is not implemented by every filesystem (s3fs)

    def shard_files(self) -> list[str]:
        return [e for e in self.entries() if e.endswith(".safetensors")]


def _content(data: bytes | Callable[[], bytes]) -> bytes:
    return data() if callable(data) else data


class LocalDest(Dest):
    """A local folder: shards are written into it and renamed into place."""

    def __init__(self, url: str | os.PathLike):
        super().__init__(url)
        self.staging = Path(self.folder.root)

    def _check_place(self, source: Folder) -> None:
        _check_creatable(Path(self.folder.root))
        if source.is_local:
            s, d = Path(source.root), Path(self.folder.root)
            if s == d or s in d.parents or d in s.parents:
                raise PtqflowError(
                    f"destination {d} and source {s} overlap; write to a separate folder"
                )

    def _clear(self) -> None:
        """Everything but this run's lease."""
        keep = Path(self.folder.root, LEASE)
        inner = list(keep.parent.iterdir()) if keep.parent.is_dir() else []
        for path in [*Path(self.folder.root).iterdir(), *inner]:
            if path in (keep, keep.parent):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def write(self, rel: str, data: bytes) -> None:
        """Store `data` as `rel`, atomically by rename."""
        path = Path(self.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def put(self, local: Path, rel: str) -> str:
        """As Dest.put; a no-op when `local` is already in place."""
        digest = file_digest(local, self.digest_algorithm)
        target = Path(self.path(rel))
        if local.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(target)
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        return digest

    @property
    def digest_algorithm(self) -> str:
        """xxh3_128: only a resume reads it here (sha256 of a 1 GB shard took as long as
        quantizing it)."""
        return "xxh3_128"

    def digest(self, rel: str, algorithm: str) -> str:
        return file_digest(self.path(rel), algorithm)


class HubDest(Dest):
    """A Hub repo (hf://org/name, created if missing, `private` if asked).

    A finished shard goes to the repo's LFS store only, and is recorded in the
    staging folder (`put`): `commit` commits every such file at once, as a commit
    per shard would run into the Hub's commit rate limits on a large model.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        staging: str | os.PathLike | None = None,
        private: bool = False,
    ):
        super().__init__(url, staging)
        self.private = private

    def _create(self) -> None:
        from huggingface_hub import HfApi

        with hub_errors(f"destination {self.url}"):
            HfApi().create_repo(self._repo()[0], private=self.private, exist_ok=True)
        self.folder.fs.invalidate_cache()  # it remembers that the repo did not exist

    def _clear(self) -> None:
        super()._clear()
        shutil.rmtree(self.staging / PENDING, ignore_errors=True)

    def put(self, local: Path, rel: str) -> str:
        from huggingface_hub import CommitOperationAdd, HfApi

        add = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local))
        repo_id, revision = self._repo()
        with hub_errors(f"destination {self.url}"):
            # an object the store already holds (a rerun after a kill) is not sent again
            HfApi().preupload_lfs_files(repo_id, [add], revision=revision)
        info = add.upload_info
        record = {"sha256": info.sha256.hex(), "size": info.size}
        if add._upload_mode == "lfs":
            local.unlink()
        else:  # committed with its content: staged until then
            record["staged"] = str(local)
        pending = self._pending_path(rel)
        pending.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(pending, json.dumps(record).encode())
        return f"sha256:{record['sha256']}"

    def _pending_path(self, rel: str) -> Path:
        return self.staging / PENDING / f"{rel}.json"

    def _pending_record(self, rel: str) -> dict | None:
        """What `put` recorded of `rel` if it is in the LFS store, not yet committed."""
        path = self._pending_path(rel)
        return json.loads(path.read_text()) if path.is_file() else None

    def _pending(self) -> dict[str, dict]:
        """Files uploaded to the LFS store and not yet committed."""
        folder = self.staging / PENDING
        if not folder.is_dir():
            return {}
        return {p.name[: -len(".json")]: json.loads(p.read_text()) for p in folder.glob("*.json")}

    def _repo(self) -> tuple[str, str | None]:
        """(repo id, revision); the repo may not exist yet."""
        repo_id, _, revision = self.folder.root.partition("@")
        return repo_id, revision or None

    def commit(
        self,
        files: dict[str, bytes | Callable[[], bytes]],
        remove: list[str],
        shards: list[str] = (),
    ) -> None:
        """As Dest.commit, in one commit (so every file is in memory then), with those of
        `shards` that were uploaded since the last commit (see `put`); other uploads are
        forgotten."""
        pending = self._pending()
        if shards:
            for rel in set(pending) - set(shards):
                self._forget(rel, pending.pop(rel))
        else:
            pending = {}
        if not (files or remove or pending):
            return
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.lfs import UploadInfo

        ops: list = [CommitOperationDelete(rel) for rel in remove]
        for rel, record in sorted(pending.items()):
            if "staged" in record:
                ops.append(CommitOperationAdd(rel, record["staged"]))
                continue
            # uploaded by an earlier process, maybe: the commit needs only its oid and size
            add = CommitOperationAdd(rel, b"")
            add.upload_info = UploadInfo(
                size=record["size"], sample=b"", sha256=bytes.fromhex(record["sha256"])
            )
            add._upload_mode, add._is_uploaded = "lfs", True
            ops.append(add)
        ops += [CommitOperationAdd(rel, _content(data)) for rel, data in files.items()]
        repo_id, revision = self._repo()
        with hub_errors(f"destination {self.url}"):
            HfApi().create_commit(
                repo_id, ops, commit_message="ptqflow: quantized checkpoint", revision=revision
            )
        self.folder.fs.invalidate_cache()
        for rel, record in pending.items():
            self._forget(rel, record)

    def _forget(self, rel: str, record: dict) -> None:
        self._pending_path(rel).unlink()
        if "staged" in record:
            Path(record["staged"]).unlink(missing_ok=True)

    def info(self, rel: str) -> dict | None:
        """As Dest.info; a shard uploaded but not yet committed counts."""
        record = self._pending_record(rel)
        if record is not None:
            return {"size": record["size"], "stamp": record["sha256"]}
        return super().info(rel)

    def digest(self, rel: str, algorithm: str) -> str:
        record = self._pending_record(rel)
        if record is not None and algorithm == "sha256":
            return f"sha256:{record['sha256']}"
        return super().digest(rel, algorithm)


def open_dest(
    url: str | os.PathLike, staging: str | os.PathLike | None = None, private: bool = False
) -> Dest:
    """DEST as the kind its URL names: a local folder, a Hub repo (`hf://`; `private` if it
    is created) or any other fsspec URL (staged in `staging`, default under PREFECT_HOME)."""
    folder = Folder(str(url))
    if folder.is_local:
        return LocalDest(url)
    if folder.is_hub:
        return HubDest(url, staging, private)
    return Dest(url, staging)
