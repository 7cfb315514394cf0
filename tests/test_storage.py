"""The streaming shard writer (O_DIRECT and buffered), file hashing and per-tensor reads."""

from __future__ import annotations

import hashlib
import io
import os
import random

import pytest
import torch
import xxhash
from safetensors.torch import save

from storage import direct
from storage.direct import BufferedOutput, DirectOutput, file_digest, open_output
from storage.errors import PtqflowError
from storage.safetensors import ShardWriter, TensorSpec, read_file_header, read_tensor


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    if request.param == "buffered":  # as on a platform without O_DIRECT (macOS)
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    return request.param


def pieces(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """[start, stop) ranges tiling `size` bytes: single bytes, block-sized and multi-chunk ones."""
    cuts, pos = [], 0
    lengths = [1, 7, 4095, 4096, 4097, 100, 3 * direct.CHUNK + 5, direct.CHUNK - 1, 12345]
    while pos < size:
        n = min(rng.choice(lengths), size - pos)
        cuts.append((pos, pos + n))
        pos += n
    return cuts


def test_writes_in_any_order_give_the_exact_bytes(tmp_path, mode):
    rng = random.Random(0)
    size = 4 * direct.CHUNK + 3 * direct.BLOCK + 1234
    content = rng.randbytes(size)
    out = open_output(tmp_path / "f", size)
    assert isinstance(out, DirectOutput if mode == "direct" else BufferedOutput)
    ranges = pieces(size, rng)
    rng.shuffle(ranges)
    for a, b in ranges:
        out.write_at(memoryview(content)[a:b], a)
    out.close()
    assert (tmp_path / "f").read_bytes() == content
    assert file_digest(tmp_path / "f") == "sha256:" + hashlib.sha256(content).hexdigest()
    xxh = "xxh3_128:" + xxhash.xxh3_128(content).hexdigest()
    assert file_digest(tmp_path / "f", "xxh3_128") == xxh


def test_a_block_never_written_is_an_error(tmp_path):
    out = open_output(tmp_path / "f", 3 * direct.BLOCK)
    if not isinstance(out, DirectOutput):
        pytest.skip("this filesystem refuses O_DIRECT")
    out.write_at(memoryview(bytes(direct.BLOCK + 10)), 0)
    out.write_at(memoryview(bytes(direct.BLOCK)), 2 * direct.BLOCK)
    with pytest.raises(RuntimeError, match="1 blocks were never completed"):
        out.close()


def specs_and_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    tensors = {}
    for i in range(12):
        rows, cols = rng.choice([(1, 3), (64, 129), (1000, 1031), (3000, 700)])
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int32])
        t = torch.randn(rows, cols, generator=g)
        tensors[f"model.layers.{i}.w{i % 3}"] = (t * 100).to(dtype)
    tensors["scalar"] = torch.tensor(3.0)
    return tensors


def test_shard_writer_gives_safetensors_bytes_in_any_order(tmp_path, mode):
    rng = random.Random(1)
    tensors = specs_and_tensors(rng)
    specs = [TensorSpec(k, *_spec(v)) for k, v in tensors.items()]
    order = list(tensors)
    rng.shuffle(order)
    with ShardWriter(tmp_path / "s.safetensors", specs) as w:
        for name in order:
            w.write(name, tensors[name])
    assert (tmp_path / "s.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
    assert not list(tmp_path.glob(".*partial"))


def test_shard_writer_leaves_nothing_when_a_tensor_fails(tmp_path, mode):
    tensors = specs_and_tensors(random.Random(2))
    specs = [TensorSpec(k, *_spec(v)) for k, v in tensors.items()]
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="boom"), ShardWriter(path, specs) as w:
        for name in list(tensors)[:5]:
            w.write(name, tensors[name])
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="never produced"):
        with ShardWriter(path, specs) as w:
            w.write(specs[0].name, tensors[specs[0].name])
    assert list(tmp_path.iterdir()) == []


def _spec(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    from storage.safetensors import DTYPE_NAMES

    return DTYPE_NAMES[t.dtype], tuple(t.shape)


def test_read_tensor_maps_local_files_and_reads_streams(tmp_path):
    tensors = {"big": torch.randn(700, 1000).to(torch.bfloat16), "small": torch.arange(10.0)}
    data = save(tensors)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    header = read_file_header(path)
    for opener in (lambda: open(path, "rb"), lambda: io.BytesIO(data)):
        with opener() as f:
            for name, want in tensors.items():
                info = header.tensors[name]
                start, stop = header.data_start + info.start, header.data_start + info.end
                got = read_tensor(f, start, stop, info.dtype, info.shape)
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                got.zero_()  # a private mapping: the file keeps its bytes
    assert path.read_bytes() == data
    info = header.tensors["big"]
    os.truncate(path, header.data_start + info.end - 1)
    with open(path, "rb") as f, pytest.raises(PtqflowError, match="ended early"):
        read_tensor(
            f, header.data_start + info.start, header.data_start + info.end, info.dtype, info.shape
        )


LEASE_CHECK = """
import fcntl, subprocess, sys, time
import torch
from safetensors.torch import save
from storage.errors import PtqflowError
from storage.safetensors import read_file_header, read_tensor

path = sys.argv[1]
tensors = {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}
open(path, "wb").write(save(tensors))
header = read_file_header(path)
def read(f, name):
    info = header.tensors[name]
    start = header.data_start + info.start
    return read_tensor(f, start, start + info.nbytes, info.dtype, info.shape)
f = open(path, "rb")
a = read(f, "a")
other = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({path!r}, 8)"])
deadline = time.monotonic() + 30
while fcntl.fcntl(f.fileno(), fcntl.F_GETLEASE) == fcntl.F_RDLCK and time.monotonic() < deadline:
    time.sleep(0.01)
assert other.poll() is None, "the truncation did not wait for the reader"
assert torch.equal(a, tensors["a"])  # every page still there: no SIGBUS
try:
    read(f, "b")
    raise SystemExit("no error for a source being changed")
except PtqflowError as e:
    print(e)
del a  # its mapping holds the file open, lease and all
f.close()
assert other.wait(30) == 0
"""


def test_a_source_truncated_while_mapped_waits_and_gives_a_clear_error(tmp_path):
    """Another process truncates a source while a tensor of it is mapped: without a read lease
    the next touch of that tensor dies of SIGBUS. With one, the truncation waits, the mapped
    tensor stays whole, the next read names the file, and freeing the file (with its mapped
    tensors) lets the truncation on."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", LEASE_CHECK, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert f"{path} is being changed by another process" in done.stdout
    assert "run the same command again" in done.stdout
    assert path.stat().st_size == 8  # the truncation went on once the reader closed


def test_copied_tensors_stream_through_a_small_buffer(tmp_path, mode, monkeypatch):
    """ShardWriter.copy in pieces of an odd size (partial blocks everywhere): save()'s bytes."""
    import storage.safetensors as st

    monkeypatch.setattr(st, "COPY_BUFFER", direct.BLOCK + 7)
    tensors = specs_and_tensors(random.Random(3))
    src = tmp_path / "src.safetensors"
    src.write_bytes(save(tensors))
    header = read_file_header(src)
    specs = [TensorSpec(k, *_spec(v)) for k, v in tensors.items()]
    with open(src, "rb") as f, ShardWriter(tmp_path / "out.safetensors", specs) as w:
        for name, info in reversed(header.tensors.items()):
            w.copy(name, f, header.data_start + info.start, info.dtype, info.shape)
    assert (tmp_path / "out.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


def test_upload_records_the_hash_a_resume_checks(tmp_path):
    """The shard's digest is taken in the upload stage; a resume trusts it when the stamp moved.

    A local DEST records xxh3_128 (only a resume reads it); sha256 is kept for remote ones."""
    from storage.dest import open_dest
    from tasks.core.keys import still_valid
    from tasks.core.records import Manifest
    from tasks.core.transfer import upload

    dest = open_dest(tmp_path / "out")
    dest.staging.mkdir(parents=True)
    data = random.Random(4).randbytes(3 * direct.BLOCK + 5)
    shard = dest.staging / "model.safetensors"
    shard.write_bytes(data)
    manifest = upload(Manifest(shard.name, len(data)), dest)
    assert manifest.digest == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    os.utime(shard, ns=(1, 1))  # a new stamp: only the hash can vouch for the file
    assert still_valid(manifest, dest)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(shard, ns=(2, 2))
    assert not still_valid(manifest, dest)


def test_each_kind_of_destination_is_one_class_and_travels_without_its_lease(tmp_path):
    """open_dest picks the kind a URL names; a Dest pickled to a Dask worker stays that
    kind and leaves its lease with the run that holds it."""
    import pickle

    from storage.dest import Dest, HubDest, LocalDest, open_dest

    local = open_dest(tmp_path / "out")
    remote = open_dest("memory://bucket/out", staging=tmp_path / "staging")
    hub = open_dest("hf://me/model", private=True)
    assert type(local) is LocalDest and local.staging == tmp_path / "out"
    assert local.digest_algorithm == "xxh3_128" and remote.digest_algorithm == "sha256"
    assert type(remote) is Dest and remote.staging == tmp_path / "staging"
    assert type(hub) is HubDest and hub.private
    for dest in (local, remote, hub):
        dest.lease()
        again = pickle.loads(pickle.dumps(dest))
        assert type(again) is type(dest) and again.url == dest.url
        assert again.staging == dest.staging and again._lease is None
