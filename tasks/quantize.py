"""Quantize weights with compressed-tensors and stream them into output shards.

Quantization parameters are computed exactly as llm-compressor's min-max weight
observer does (same reshapes, same dtypes), then compressed-tensors' own
`calculate_qparams`, `generate_gparam` and compressor classes produce the
stored tensors, so the bytes are those compressed-tensors produces itself.

On the CPU a weight is quantized in row chunks that stay in cache, spread
over one single-threaded worker per core, and the common schemes (FP8, INT4
packed, NVFP4) take shorter routes to the same bytes than compressed-tensors'
own CPU code; tests/test_quantize_speed.py holds the proofs.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import BinaryIO

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.safetensors import DTYPE_NAMES, DTYPES, ShardWriter, read_tensor
from tasks.dequantize import Codec
from tasks.errors import disk_full_is
from tasks.plan import Read, ShardPlan, Unit

Tensors = dict[str, torch.Tensor]

# Elements per row chunk: a chunk's input and intermediates stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 20


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `weight` per scale element (llm-compressor's min-max observer).

    Reduces strided views in place of the observer's transposed copies: min and
    max are exact in any order, so the values are the observer's. On the CPU,
    16-bit weights are reduced per row, group or block as float32, which torch
    reduces 1.5-3x faster; both conversions are exact.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == S.TENSOR:
        return torch.amin(weight).reshape(1), torch.amax(weight).reshape(1)
    x = weight
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    if args.strategy == S.CHANNEL:
        lo, hi = torch.amin(x, dim=-1, keepdim=True), torch.amax(x, dim=-1, keepdim=True)
    elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
        if weight.shape[-1] % args.group_size:
            raise ValueError(
                f"{weight.shape[-1]} columns are not divisible by group size {args.group_size}"
            )
        groups = x.unflatten(-1, (-1, args.group_size))
        lo, hi = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)
    elif args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(x, tuple(args.block_structure))
        rows, cols = padded.shape
        blocks = padded.view(rows // bh, bh, cols // bw, bw)
        lo, hi = torch.amin(blocks, dim=(1, 3)), torch.amax(blocks, dim=(1, 3))
    else:
        raise ValueError(f"strategy {args.strategy} cannot be applied to weights")
    return lo.to(weight.dtype), hi.to(weight.dtype)


def scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype compressed-tensors gives a weight's scale parameter before compression."""
    if weight_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return weight_dtype
    return torch.float16


def row_chunks(weight: torch.Tensor, args, chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) that quantize independently of each other.

    Rows are independent given their scales; a chunk holds whole scale blocks
    (BLOCK) and a multiple of 32 rows, so a zero point packed along rows
    (pack-quantized, asymmetric) packs into whole int32 words.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S

    rows, cols = weight.shape
    if weight.is_meta or rows == 0:
        return [(0, rows)]
    unit = math.lcm(32, args.block_structure[0] if args.strategy == S.BLOCK else 1)
    step = max(unit, chunk_elements // max(cols, 1) // unit * unit)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _join(pieces: Iterable[Tensors], shared: set[str], weight: torch.Tensor, scheme) -> Tensors:
    """One compressed state dict from those of consecutive row chunks, filled as they come.

    `shared` keys were passed whole to every chunk (global scale, per-tensor
    scale) and come back unchanged; `weight_shape` (pack-quantized) is the
    original shape; everything else is per row, copied into place in a tensor
    allocated once with the shape the whole weight gives on the meta device,
    so each chunk's piece is freed as soon as it is copied.
    """
    layout = _layout(tuple(weight.shape), DTYPE_NAMES[weight.dtype], scheme.model_dump_json())
    out, filled = {}, {}
    for piece in pieces:
        for key, part in piece.items():
            if key in shared:
                out.setdefault(key, part)
            elif key == "weight_shape":
                out.setdefault(key, torch.tensor(weight.shape, dtype=part.dtype))
            else:
                if key not in out:
                    dtype, shape = layout[key]
                    out[key] = torch.empty(shape, dtype=DTYPES[dtype], device=part.device)
                    filled[key] = 0
                _copy_rows(out[key], filled[key], part)
                filled[key] += len(part)
    for key, rows in filled.items():
        if rows != len(out[key]):
            raise RuntimeError(f"row chunks gave {rows} rows of {key}, expected {len(out[key])}")
    return out


def _copy_rows(dst: torch.Tensor, start: int, part: torch.Tensor) -> None:
    """dst[start : start + len(part)] = part, on the CPU as one plain memcpy.

    torch would split the copy over its OpenMP threads, whose spinning then
    competes with the chunk workers still running (NVFP4 took twice as long).
    """
    rows = dst[start : start + len(part)]
    if dst.device.type != "cpu" or not part.numel():
        rows.copy_(part)
        return
    target = rows.view(-1).view(torch.uint8).numpy()
    target[...] = part.contiguous().reshape(-1).view(torch.uint8).numpy()


@functools.lru_cache(maxsize=1024)
def _layout(shape: tuple[int, ...], dtype: str, scheme_json: str) -> dict[str, tuple[str, tuple]]:
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme.model_validate_json(scheme_json)
    return {name: (dt, shp) for name, dt, shp in meta_outputs(shape, dtype, scheme)}


def _global_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """The TENSOR_GROUP (NVFP4) global scale shared by `weights`, as llm-compressor fuses it."""
    from compressed_tensors.quantization.utils import generate_gparam

    absmax = None
    for w in weights:
        lo, hi = torch.aminmax(w)
        m = torch.max(-lo, hi)
        absmax = m if absmax is None else torch.max(absmax, m)
    return generate_gparam(-absmax.reshape(1), absmax.reshape(1))


# --- shorter routes to compressed-tensors' bytes ------------------------------------------
#
# compressed-tensors' CPU path converts and copies more than its result needs:
# clamps with tensor bounds (a slow broadcast), rounds FP8 through the weight's
# dtype and back (an unvectorized conversion), and packs INT4 by scatter-adds.
# These routes do the same arithmetic on the same operands in fewer passes;
# tests/test_quantize_speed.py checks them against compressed-tensors on every
# bf16 and fp16 quotient value and on whole weights with edge values.


def _divide(x: torch.Tensor, scale: torch.Tensor, args) -> torch.Tensor:
    """x / scale per element with compressed-tensors' operands and dtypes, in x's shape."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(x, tuple(args.block_structure))
        rows, cols = padded.shape
        blocks = padded.view(rows // bh, bh, cols // bw, bw)
        q = blocks / scale.view(rows // bh, 1, cols // bw, 1)
        return q.view(rows, cols)[: x.shape[0], : x.shape[1]]
    if args.strategy in (S.GROUP, S.TENSOR_GROUP):
        return (x.unflatten(-1, (-1, args.group_size)) / scale.unsqueeze(-1)).flatten(-2)
    return x / scale


def _fp8_weight(x: torch.Tensor, scale: torch.Tensor, args) -> torch.Tensor:
    """compressed-tensors' FP8 weight: clamp(x / scale) -> fp8 -> x.dtype -> fp8.

    With finite operands the quotient is finite: clamping with Python-number
    bounds gives what tensor bounds give, and the round trip through x.dtype
    returns every finite fp8 value unchanged, so one in-place clamp and one
    conversion remain.
    """
    from compressed_tensors.quantization.quant_args import FP8_E4M3_DATA

    q = _divide(x, scale, args)
    return q.clamp_(FP8_E4M3_DATA.min, FP8_E4M3_DATA.max).to(FP8_E4M3_DATA.dtype)


def _int4_packed(x: torch.Tensor, scale: torch.Tensor, args) -> torch.Tensor:
    """pack_to_int32(round(clamp(x / scale, -8, 7)), 4) for rows of a multiple of 8 values.

    pack_to_int32 puts value k of each run of 8 (offset by 8) at bits 4k of an
    int32; on a little-endian host that is byte k // 2, low nibble for even k.
    """
    q = _divide(x, scale, args).clamp_(-8, 7).round_().add_(8).to(torch.uint8)
    pairs = q.view(q.shape[0], -1, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed.view(torch.int32)


# Round-to-nearest-even boundaries of |x| between the FP4 (E2M1) magnitudes
# 0, 0.5, 1, 1.5, 2, 3, 4, 6, as compressed-tensors' cast_to_fp4 draws them:
# (boundary, whether the boundary itself rounds up).
FP4_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
             (3.5, True), (5.0, False))  # fmt: skip


def _fp4_packed(x: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, args):
    """quantize_and_pack_fp4(x, scale, global_scale) where scale / global_scale is finite, not 0.

    compressed-tensors clamps x / (scale / global_scale) to [-6, 6], rounds it
    to FP4 with 8 masked writes, then recovers each FP4 code from the rounded
    value with 8 more. The code is the number of boundaries below |x| (ties
    rounding to the even code), plus 8 for x < 0 (a value that rounds to zero
    keeps its sign, an exact -0.0 does not: torch.sign(-0.0) is 0).
    """
    q = _divide(x, scale / global_scale, args).clamp_(-6.0, 6.0)
    a = q.abs()
    code = (q < 0).to(torch.uint8).mul_(8)
    for boundary, up in FP4_STEPS:
        code += a >= boundary if up else a > boundary
    pairs = code.view(code.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def compress_function(scheme) -> Callable[[Tensors], Tensors]:
    """compressed-tensors' compressor.compress(state, scheme), by a shorter route where one exists.

    The routes take symmetric FP8 (tensor, channel, block), INT4 pack-quantized
    (channel, group) and NVFP4 weights whose scales are finite (NVFP4: and
    nonzero). A scale is finite exactly when the values it scales are (min and
    max propagate NaN and infinity), so the routes never see the NaNs whose sign
    compressed-tensors' conversions rewrite; rows with an infinite or NaN weight
    go through compressed-tensors itself.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationStrategy as S

    from tasks.schemes import scheme_format

    args, fmt = scheme.weights, scheme_format(scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    kind = (args.type, args.num_bits, args.strategy)
    fp8 = fmt in ("float-quantized", "naive-quantized") and kind in (
        ("float", 8, S.TENSOR), ("float", 8, S.CHANNEL), ("float", 8, S.BLOCK)
    )  # fmt: skip
    int4 = fmt == "pack-quantized" and kind in (("int", 4, S.CHANNEL), ("int", 4, S.GROUP))
    fp4 = fmt == "nvfp4-pack-quantized" and kind == ("float", 4, S.TENSOR_GROUP)
    shortcut = (fp8 or int4 or fp4) and args.symmetric and sys.byteorder == "little"

    def compress(state: Tensors) -> Tensors:
        w, scale = state["weight"], state["weight_scale"]
        if fp4 and not w.is_meta:
            scale = scale / state["weight_global_scale"]  # what the FP4 values are scaled by
        if (
            not shortcut
            or w.is_meta
            or (int4 and w.shape[-1] % 8)
            or not torch.isfinite(scale).all()
            or (fp4 and not scale.all())
        ):
            return compressor.compress(state, scheme)
        out = {k: v for k, v in state.items() if k != "weight"}
        if fp8:
            out["weight"] = _fp8_weight(w, scale, args)
        elif int4:
            out["weight_packed"] = _int4_packed(w, scale, args)
            out["weight_shape"] = torch.tensor(w.shape)
        else:
            out["weight_packed"] = _fp4_packed(w, state["weight_scale"],
                                               state["weight_global_scale"], args)  # fmt: skip
            del out["weight_scale"]  # stored as the compressor stores it, after the weight
            out["weight_scale"] = compressor._compress_scale(state["weight_scale"], args)
        return out

    return compress


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One thread per core for row chunks, each running torch's ops on itself alone.

    Small ops split over torch's OpenMP threads end in a barrier each; on a
    busy machine one descheduled thread stalls the others at every op, which
    made chunked quantization several times slower than on one thread.
    Chunks on separate single-threaded workers never wait for each other.
    (torch.set_num_threads in a worker sets that thread's OpenMP team size,
    and the default for threads that have not run a parallel op yet.)
    """
    return ThreadPoolExecutor(
        os.cpu_count() or 1, thread_name_prefix="ptqflow-quantize",
        initializer=torch.set_num_threads, initargs=(1,),
    )  # fmt: skip


def _compress_rows(weight, r0: int, r1: int, *, args, compress, whole: dict) -> Tensors:
    """Compressed state dict of rows [r0, r1) of `weight`.

    `whole` holds parameters computed on the whole weight (global scale, or
    the per-tensor scale and zero point); everything else comes from the
    chunk's own min and max, which are those of its rows in the whole weight.
    """
    from compressed_tensors.quantization.utils import calculate_qparams

    part = weight[r0:r1]
    state = {"weight": part, **whole}
    if "weight_scale" not in whole:
        lo, hi = observe(part, args)
        scale, zero_point = calculate_qparams(
            lo, hi, args, global_scale=whole.get("weight_global_scale")
        )
        state["weight_scale"] = scale.to(scale_dtype(weight.dtype))
        if not args.symmetric:
            state["weight_zero_point"] = zero_point.to(args.zp_dtype)
    return compress(state)


@torch.no_grad()
def quantize_weights(
    weights: list[torch.Tensor], scheme, chunk_elements: int = CHUNK_ELEMENTS
) -> list[Tensors]:
    """Compressed state dicts (local names: weight_packed, weight_scale, ...) of `weights`.

    The weights share one global scale when the scheme has one (NVFP4): pass
    all members of a fused set together. Each weight is observed, quantized
    and compressed in row chunks of about `chunk_elements` elements, which
    gives the bytes compressed-tensors gives for the whole weight.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    compress = compress_function(scheme)
    whole = {}
    if args.strategy == S.TENSOR_GROUP:
        whole["weight_global_scale"] = _global_scale(weights).to(torch.float32)
    out = []
    for w in weights:
        shared = dict(whole)
        if args.strategy == S.TENSOR:
            scale, zero_point = calculate_qparams(*observe(w, args), args)
            shared["weight_scale"] = scale.to(scale_dtype(w.dtype))
            if not args.symmetric:
                shared["weight_zero_point"] = zero_point.to(args.zp_dtype)
        chunks = row_chunks(w, args, chunk_elements)
        rows = functools.partial(_compress_rows, w, args=args, compress=compress, whole=shared)
        if len(chunks) == 1:
            out.append(rows(*chunks[0]))
            continue
        parallel = _pool().map if w.device.type == "cpu" else map
        pieces = parallel(lambda c, rows=rows: rows(*c), chunks)
        out.append(_join(pieces, set(shared), w, scheme))
    return out


def read_unit(
    unit: Unit, files: dict[str, BinaryIO], codec: Codec | None, device: str | torch.device
) -> list[torch.Tensor | Tensors]:
    """The weights of one unit, as read; dequantized where the source stores them quantized.

    A weight kept in its source's quantization comes back as its state dict in
    compressed-tensors form. For a GPU, tensors are read into pinned memory so
    their copies to it do not block.
    """
    out, pin = [], torch.device(device).type == "cuda"
    for w in unit.weights:
        tensors = {r.tensor: read_tensor(files[r.file], r.start, r.stop, r.dtype, r.shape, pin)
                   for r in w.reads}  # fmt: skip
        if not w.encoded:
            out.append(tensors[w.read.tensor])
            continue
        tensors = {k: t.to(device, non_blocking=True) for k, t in tensors.items()}
        if w.decoded is None:
            out.append(codec.keep(tensors))
            continue
        t = codec.decode(tensors)
        if DTYPE_NAMES[t.dtype] != w.dtype or tuple(t.shape) != w.shape:
            raise ValueError(f"{w.name} dequantized to {DTYPE_NAMES[t.dtype]} {list(t.shape)}, "
                             f"the plan expected {w.dtype} {list(w.shape)}")  # fmt: skip
        out.append(t)
    return out


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
        (f"{w.module}.{key}", value)
        for w, state in zip(unit.weights, states, strict=True)
        for key, value in state.items()
    ]


def write_shard(
    shard: ShardPlan,
    open_source: Callable[[str], BinaryIO],
    out_dir: Path,
    schemes: dict,
    device: str | torch.device = "cpu",
    overlap: bool | None = None,
) -> dict:
    """Write one output shard into `out_dir`, tensor by tensor; returns its manifest.

    `open_source(file)` opens a source file for reading; `schemes` maps config
    group -> QuantizationScheme. Only the tensors of one unit (one weight, or
    one fused set) are in memory at a time; three with `overlap`, the default
    on a GPU (see `_overlapped`). The manifest's `stages` holds the seconds
    spent reading (and dequantizing a pre-quantized source), quantizing and
    writing (with fsync); the upload stage adds the shard's hash.
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

    full = (f"disk full while writing {out_dir / shard.name}; free space and run the same "
            "command again: finished shards are kept")  # fmt: skip
    with disk_full_is(full), ExitStack() as stack:
        files = {name: stack.enter_context(open_source(name)) for name in shard.files}
        # tensors copied unchanged are streamed by the write stage: on its own thread, with
        # its own file objects (a file's position cannot be shared between threads)
        copies = {name: stack.enter_context(open_source(name)) for name in shard.files} \
            if overlap else files  # fmt: skip
        writer = stack.enter_context(ShardWriter(out_dir / shard.name, shard.specs))
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
    manifest = {
        "name": shard.name,
        "size": (out_dir / shard.name).stat().st_size,
        "bytes_in": shard.bytes_in,
        "seconds": round(time.monotonic() - start, 3),
        "stages": {k: round(v, 3) for k, v in stages.items()},
    }
    return manifest


def _copied(unit: Unit) -> bool:
    """Is the unit written exactly as the source stores it (not quantized, not decoded)?"""
    return unit.group is None and not any(w.encoded for w in unit.weights)


def _overlapped(units: list[Unit], read: Callable, quantize: Callable, write: Callable,
                timed: Callable) -> None:  # fmt: skip
    """Read unit i+1 and write unit i-1 on their own threads while unit i is quantized.

    On a GPU the host's reads (into pinned memory) and the copies to the device
    then overlap the device's compute, and the copies back and the disk writes
    overlap both. Each stage waits for the one before it to hand over, so at
    most three units are in memory, whatever the shard's size.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="ptqflow-read") as reads, \
            ThreadPoolExecutor(1, thread_name_prefix="ptqflow-write") as writes:  # fmt: skip
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


def meta_outputs(shape: tuple[int, ...], dtype: str, scheme) -> list[tuple[str, str, tuple]]:
    """(local name, dtype, shape) of what quantizing a weight of this shape produces.

    Runs the real quantization code on the meta device, so a shape the scheme
    cannot represent fails here, before any data is read.
    """
    weight = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    (state,) = quantize_weights([weight], scheme)
    zero_point = state.get("weight_zero_point")
    if "weight_packed" in state and zero_point is not None and zero_point.dtype != torch.int32:
        # pack-quantized returns early on meta, before it packs an asymmetric zero point
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        zeros = torch.zeros(zero_point.shape, dtype=zero_point.dtype)
        state["weight_zero_point"] = pack_to_int32(zeros, scheme.weights.num_bits, packed_dim=0)
    return [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in sorted(state.items())]


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(shard: ShardPlan, paths: dict[str, str], out_dir: str, config, device: str,
                  limit: str | None = None) -> dict:  # fmt: skip
    """Quantize one shard from downloaded `paths`.

    `limit` names the Prefect global concurrency limit of `device`, so shards on
    one GPU never compete for its memory, whichever process or machine runs them.
    """
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, strict=True) if limit else nullcontext():
        return write_shard(shard, lambda f: open(paths[f], "rb"), Path(out_dir),
                           config.config_groups, device)  # fmt: skip
