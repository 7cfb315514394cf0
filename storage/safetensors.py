"""Read safetensors headers and tensors one at a time, and write shards by streaming.

Each tensor is mapped (or read) on its own and released when it is freed,
unlike safetensors' mapping of a whole file, so the pages of a shard do not
stay resident while the rest of it is processed: memory is bounded by the
largest unit of work, not by the shard.

Writing follows the safetensors layout (8-byte little-endian header length,
JSON header padded with spaces to 8 bytes, then the data) but plans the whole
header from shapes first, so every tensor can be written at its final offset
as soon as it is produced.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import torch

from storage.direct import open_output
from storage.errors import PtqflowError
from storage.names import partial_path

try:
    import fcntl
except ImportError:  # Windows: no leases, so every tensor is read
    fcntl = None

# safetensors' dtype names -> torch's, for the dtypes this torch has (float8_e8m0fnu came in 2.7)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("BOOL", "bool"),
        ("U8", "uint8"),
        ("I8", "int8"),
        ("I16", "int16"),
        ("U16", "uint16"),
        ("I32", "int32"),
        ("U32", "uint32"),
        ("I64", "int64"),
        ("U64", "uint64"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("F32", "float32"),
        ("F64", "float64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E8M0", "float8_e8m0fnu"),
    )
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# safetensors' own file order: dtypes from last to first of its Dtype enum (widest first), then name
FILE_ORDER = (
    "U64",
    "I64",
    "F64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E8M0",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "BOOL",
)
MAX_HEADER = 100_000_000
MMAP_MIN = 1 << 20
COPY_BUFFER = 8 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets relative to the data start)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a planned output shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def read_header(f: BinaryIO, file_size: int, label: str) -> Header:
    """Parse and check a safetensors header; `label` names the file in errors."""

    def corrupt(why: str) -> PtqflowError:
        return PtqflowError(
            f"{label} is not a valid safetensors file ({why}). "
            "Re-download or re-create it, then run again."
        )

    raw = f.read(8)
    if len(raw) < 8:
        raise corrupt("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > file_size:
        raise corrupt(f"header length {n} does not fit in {file_size} bytes")
    try:
        meta = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise corrupt("header is not a JSON object")
    meta.pop("__metadata__", None)
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in meta.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype}")
        info = TensorInfo(dtype, shape, start, stop)
        expected = info.itemsize
        for d in shape:
            expected *= d
        if stop - start != expected or start < 0:
            raise corrupt(f"tensor {name!r} offsets do not match its shape")
        tensors[name] = info
        end = max(end, stop)
    if data_start + end > file_size:
        raise corrupt(f"truncated: tensors need {data_start + end} bytes, the file has {file_size}")
    return Header(tensors, data_start, file_size)


def read_file_header(path: str | os.PathLike, label: str | None = None) -> Header:
    with open(path, "rb") as f:
        return read_header(f, os.fstat(f.fileno()).st_size, label or str(path))


def read_tensor(
    f: BinaryIO, start: int, stop: int, dtype: str, shape: tuple[int, ...], pin: bool = False
) -> torch.Tensor:
    """The bytes [start, stop) of an open file as a CPU tensor.

    A tensor of a local file that `f` holds a read lease on (see `_leased`) is
    a private mapping of just its own pages: the page cache is not copied, and
    the pages are unmapped when the tensor is freed. Other files (fsspec
    streams, files without a lease) and small tensors are read into an
    uninitialized buffer (a zeroed bytearray would write every page once more).
    `pin` reads into page-locked memory, from which a copy to a GPU runs
    asynchronously.
    """
    n, fd = stop - start, None if pin or stop - start < MMAP_MIN else _fileno(f)
    if fd is not None and _leased(f, fd) and os.fstat(fd).st_size >= stop:
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, stop - base, offset=base, access=mmap.ACCESS_COPY)
        buf = torch.frombuffer(mapped, dtype=torch.uint8, offset=start - base, count=n)
        return buf.view(DTYPES[dtype]).reshape(shape)
    if not n:
        return torch.empty(shape, dtype=DTYPES[dtype])
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    read_into(f, start, memoryview(buf.numpy()))
    return buf.view(DTYPES[dtype]).reshape(shape)


# file object -> whether it holds a read lease (False where none could be taken)
_LEASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _leased(f: BinaryIO, fd: int) -> bool:
    """Whether `f`'s pages may be mapped: only under a read lease (fcntl(2) F_SETLEASE).

    A file truncated under a mapping kills the process with SIGBUS. Under a
    lease, another process that opens the file for writing or truncates it
    waits instead (up to /proc/sys/fs/lease-break-time, 45 s by default), and
    the next tensor read from `f` raises a clear error; closing `f` lets that
    process go on. Where no lease can be taken (a file of another user, a
    filesystem without leases, an OS without them), tensors are read, never mapped.
    """
    leased = _LEASES.get(f)
    if leased is None:
        leased = _LEASES[f] = _take_lease(fd)
    if leased and fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
        raise PtqflowError(
            f"{_name(f)} is being changed by another process (opened for writing or "
            "truncated) while ptqflow reads it; let that finish, then run the same command "
            "again: finished shards are kept"
        )
    return leased


def _take_lease(fd: int) -> bool:
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):
        return False
    try:
        # a lease break signals its holder, with SIGIO unless told otherwise, and SIGIO
        # would kill the process: SIGURG is ignored unless handled (the lease is polled)
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    return True


def _name(f: BinaryIO) -> str:
    return str(getattr(f, "path", getattr(f, "name", "a source file")))


def read_into(f: BinaryIO, start: int, view: memoryview) -> None:
    """Fill `view` with the bytes of `f` from offset `start`."""
    f.seek(start)
    got = f.readinto(view)
    if got != len(view):
        raise PtqflowError(
            f"{_name(f)} ended early "
            f"({got} of {len(view)} bytes at offset {start}); was it modified during the run?"
        )


def _fileno(f: BinaryIO) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def layout(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """Header bytes and data offset of each tensor, in safetensors' order.

    Tensors are laid out by dtype, then name, exactly as safetensors' own
    serializer does (so a shard is byte-identical to `save_file` of its
    tensors), which also aligns every tensor to its element size.
    """
    ordered = sorted(specs, key=lambda s: (FILE_ORDER.index(s.dtype), s.name))
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for s in ordered:
        offsets[s.name] = pos
        meta[s.name] = {
            "dtype": s.dtype,
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        pos += s.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class ShardWriter:
    """Write one safetensors shard whose header is planned before any data exists.

    Data goes to ``<name>.partial`` beside the target (with O_DIRECT where the
    filesystem allows, see storage/direct.py); `close` checks that every
    planned tensor was written, fsyncs, calls `before_rename` (which records
    what the file is) and renames, so a shard file under its final name is
    always complete, and recorded.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: list[TensorSpec],
        before_rename: Callable[[], None] | None = None,
    ):
        self.path = Path(path)
        self.before_rename = before_rename
        self.tmp = partial_path(self.path)
        self.specs = {s.name: s for s in specs}
        header, self.offsets = layout(specs)
        self.data_start = len(header)
        self.size = self.data_start + sum(s.nbytes for s in specs)
        self.pending = set(self.specs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.out = open_output(self.tmp, self.size)
        self.out.write_at(memoryview(header), 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._claim(name, DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self.out.write_at(memoryview(data.numpy()), self.data_start + self.offsets[name])

    @cached_property
    def buffer(self) -> bytearray:
        """What `copy` streams through, allocated only for a shard that copies a tensor."""
        return bytearray(COPY_BUFFER)

    def copy(self, name: str, f: BinaryIO, start: int, dtype: str, shape: tuple[int, ...]) -> None:
        """Write tensor `name` from the bytes of `f` at `start`, one buffer at a time.

        A tensor copied unchanged (an embedding, a norm, an ignored layer) is
        never whole in memory, however large.
        """
        spec = self._claim(name, dtype, shape)
        view = memoryview(self.buffer)
        for pos in range(0, spec.nbytes, len(view)):
            part = view[: min(len(view), spec.nbytes - pos)]
            read_into(f, start + pos, part)
            self.out.write_at(part, self.data_start + self.offsets[name] + pos)

    def _claim(self, name: str, dtype: str | None, shape: tuple[int, ...]) -> TensorSpec:
        """The planned spec of `name`, checked against what is about to be written."""
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise RuntimeError(f"{name} is not planned for {self.path.name} or was written twice")
        if (dtype, shape) != (spec.dtype, spec.shape):
            raise RuntimeError(
                f"{name}: produced {(dtype, shape)}, planned {(spec.dtype, spec.shape)} "
                f"for {self.path.name}"
            )
        self.pending.discard(name)
        return spec

    def close(self) -> None:
        if self.pending:
            missing = ", ".join(sorted(self.pending)[:5])
            self.abort()
            raise RuntimeError(f"{self.path.name}: tensors never produced: {missing}")
        try:
            self.out.close()
            if self.before_rename is not None:
                self.before_rename()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.out.abort()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
