"""Write one output shard, unit by unit, streamed from its source files.

The weight math is tasks/core/quant/compress.py; here each unit is read (mapped, or
pinned and copied for a GPU; dequantized for a pre-quantized source; rotated),
quantized and written at its planned offset, with the stages overlapped on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import BinaryIO

import torch

from storage.dest import write_atomic
from storage.errors import disk_full_is
from storage.safetensors import DTYPE_NAMES, ShardWriter, read_tensor
from tasks.core.codecs import Codec
from tasks.core.quant.compress import Tensors, quantize_weights
from tasks.core.records import Manifest, Read, ShardPlan, Unit, View
from tasks.core.rotate import rotate

__all__ = [
    "claim_path",
    "claimed",
    "read_unit",
    "staged",
    "unit_outputs",
    "write_shard",
]


def read_unit(
    unit: Unit, files: dict[str, BinaryIO], codec: Codec | None, device: str | torch.device
) -> list[torch.Tensor | Tensors]:
    """The weights of one unit, as read; dequantized where the source stores them quantized.

    A weight kept in its source's quantization comes back as its state dict in
    compressed-tensors form. For a GPU, tensors are read into pinned memory so
    their copies to it do not block.
    """
    out, pin = [], torch.device(device).type == "cuda"

    def read(r: Read) -> torch.Tensor:
        return read_tensor(files[r.file], r.start, r.stop, r.dtype, r.shape, pin)

    for w in unit.weights:
        tensors = {r.tensor: read(r) for r in (w.read, *w.deps)}
        if not w.encoded:
            t = cut(tensors[w.read.tensor], w.view) if w.view else tensors[w.read.tensor]
        else:
            tensors = {k: t.to(device, non_blocking=True) for k, t in tensors.items()}
            if w.decoded is None:
                out.append(codec.keep(tensors))
                continue
            t = codec.decode(tensors)
            if DTYPE_NAMES[t.dtype] != w.dtype or tuple(t.shape) != w.shape:
                raise ValueError(
                    f"{w.name} dequantized to {DTYPE_NAMES[t.dtype]} {list(t.shape)}, "
                    f"the plan expected {w.dtype} {list(w.shape)}"
                )
        if w.rotation is not None:
            norm = read(w.norm).to(device, non_blocking=True) if w.norm else None
            t = rotate(t.to(device, non_blocking=True), w.rotation, norm)
        out.append(t)
    return out


def cut(t: torch.Tensor, view: View) -> torch.Tensor:
    """The weight `view` cuts from the matrix `t` (one expert of a fused 3-D tensor)."""
    t = t[:, view.start : view.stop]
    return (t.T if view.transpose else t).contiguous()


def unit_outputs(unit, tensors: list, schemes: dict, device) -> list[tuple]:
    """(output name, tensor) pairs of one unit: quantized, or the tensors as read."""
    if unit.group is None:
        return [
            pair
            for w, t in zip(unit.weights, tensors, strict=True)
            for pair in (t.items() if isinstance(t, dict) else [(w.name, t)])
        ]
    tensors = [t.to(device, non_blocking=True) for t in tensors]
    states = quantize_weights(tensors, schemes[unit.group])
    return [
        (w.output(key), value)
        for w, state in zip(unit.weights, states, strict=True)
        for key, value in state.items()
        if key not in w.skip
    ]


def claim_path(out_dir: Path, name: str) -> Path:
    """Where the key of the shard `name` written into `out_dir` is recorded."""
    return out_dir / ".ptqflow" / "shards" / f"{name}.key"


def claimed(out_dir: Path, name: str, key: str) -> bool:
    """Whether `out_dir` holds the shard `name` whole, written for `key`: its key was recorded
    before the rename that gave it its name, so a run killed after that rename, before its
    result was stored, is not redone (its finished file is never rewritten)."""
    try:
        return (out_dir / name).is_file() and claim_path(out_dir, name).read_text() == key
    except OSError:
        return False


def staged(out_dir: Path, shard: ShardPlan, key: str) -> Manifest | None:
    """The manifest of `shard` if `out_dir` holds it whole, written for `key` (see `claimed`),
    marked cached: an earlier run wrote it. None if it must be written."""
    if not claimed(out_dir, shard.name, key):
        return None
    size = (out_dir / shard.name).stat().st_size
    return Manifest(shard.name, size, shard.bytes_in, cached=True)


def _record(out_dir: Path, name: str, key: str) -> None:
    path = claim_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, key.encode())


def write_shard(
    shard: ShardPlan,
    open_source: Callable[[str], BinaryIO],
    out_dir: Path,
    schemes: dict,
    device: str | torch.device = "cpu",
    overlap: bool | None = None,
    claim: str | None = None,
) -> Manifest:
    """Write one output shard into `out_dir`, tensor by tensor; returns its manifest.

    `open_source(file)` opens a source file for reading; `schemes` maps config
    group -> QuantizationScheme. Only the tensors of one unit (one weight, or
    one fused set) are in memory at a time; three with `overlap`, the default
    on a GPU (see `_overlapped`). The manifest's `stages` holds the seconds
    spent reading (and dequantizing a pre-quantized source), quantizing and
    writing (with fsync); the upload stage adds the shard's hash. `claim` (the
    shard's key) is recorded beside it before the rename (see `claimed`).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    overlap = cuda if overlap is None else overlap
    start = time.monotonic()
    stages = dict.fromkeys(("read", "quantize", "write"), 0.0)

    def timed(stage: str, fn: Callable, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stages[stage] += time.perf_counter() - t0  # each stage runs on one thread

    full = (
        f"disk full while writing {out_dir / shard.name}; free space and run the same "
        "command again: finished shards are kept"
    )
    with disk_full_is(full), ExitStack() as stack:
        files = {name: stack.enter_context(open_source(name)) for name in shard.files}
        # tensors copied unchanged are streamed by the write stage: on its own thread, with
        # its own file objects (a file's position cannot be shared between threads)
        copies = (
            {name: stack.enter_context(open_source(name)) for name in shard.files}
            if overlap
            else files
        )
        record = (lambda: _record(out_dir, shard.name, claim)) if claim else None
        writer = stack.enter_context(ShardWriter(out_dir / shard.name, shard.specs, record))
        codec = Codec(shard.source_format) if shard.source_format else None
        side = torch.cuda.Stream(device) if cuda and overlap else None

        def read(unit: Unit):
            """The unit's weights; on a GPU side stream, already copying to the device.
            None for a unit copied unchanged: `write` streams it from the source."""
            if _copied(unit):
                return None, None
            with torch.cuda.stream(side) if side else nullcontext():
                tensors = read_unit(unit, files, codec, device)
                if side and unit.group is not None:
                    tensors = [t.to(device, non_blocking=True) for t in tensors]
                return tensors, side.record_event() if side else None

        def quantize(unit: Unit, loaded) -> tuple[list, object]:
            """The unit's outputs; from a GPU, copying to pinned host memory."""
            tensors, copied = loaded
            if tensors is None:
                return [(w.name, w.read) for w in unit.weights], None
            if copied is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(copied)
                for t in tensors:  # allocated on the side stream, used on this one
                    for part in t.values() if isinstance(t, dict) else [t]:
                        if part.is_cuda:
                            part.record_stream(stream)
            outputs = unit_outputs(unit, tensors, schemes, device)
            if not cuda:
                return outputs, None
            outputs = [(name, t.to("cpu", non_blocking=True)) for name, t in outputs]
            return outputs, torch.cuda.current_stream(device).record_event()

        def write(produced) -> None:
            outputs, copied = produced
            if copied is not None:
                copied.synchronize()
            for name, value in outputs:
                if isinstance(value, Read):
                    writer.copy(name, copies[value.file], value.start, value.dtype, value.shape)
                else:
                    writer.write(name, value)

        if overlap:
            _overlapped(shard.units, read, quantize, write, timed)
        else:
            for unit in shard.units:
                loaded = timed("read", read, unit)
                timed("write", write, timed("quantize", quantize, unit, loaded))
                del loaded
    return Manifest(
        name=shard.name,
        size=(out_dir / shard.name).stat().st_size,
        bytes_in=shard.bytes_in,
        seconds=round(time.monotonic() - start, 3),
        stages={k: round(v, 3) for k, v in stages.items()},
    )


def _copied(unit: Unit) -> bool:
    """Is the unit written exactly as the source stores it (not quantized, decoded or
    rotated)?"""
    return unit.group is None and not any(w.encoded or w.rotation or w.view for w in unit.weights)


def _overlapped(
    units: list[Unit], read: Callable, quantize: Callable, write: Callable, timed: Callable
) -> None:
    """Read unit i+1 and write unit i-1 on their own threads while unit i is quantized.

    On a GPU the host's reads (into pinned memory) and the copies to the device
    then overlap the device's compute, and the copies back and the disk writes
    overlap both. Each stage waits for the one before it to hand over, so at
    most three units are in memory, whatever the shard's size.
    """
    with (
        ThreadPoolExecutor(1, thread_name_prefix="ptqflow-read") as reads,
        ThreadPoolExecutor(1, thread_name_prefix="ptqflow-write") as writes,
    ):
        loading = reads.submit(timed, "read", read, units[0]) if units else None
        written = None
        for i, unit in enumerate(units):
            loaded = loading.result()
            if i + 1 < len(units):
                loading = reads.submit(timed, "read", read, units[i + 1])
            produced = timed("quantize", quantize, unit, loaded)
            del loaded
            if written is not None:
                written.result()
            written = writes.submit(timed, "write", write, produced)
            del produced
        if written is not None:
            written.result()
