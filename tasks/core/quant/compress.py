"""Quantize and compress weights: the bytes compressed-tensors would produce, faster.

Quantization parameters are computed exactly as llm-compressor's min-max weight
observer does (same reshapes, same dtypes), then compressed-tensors' own
`calculate_qparams`, `generate_gparam` and compressor classes produce the
stored tensors, so the bytes are those compressed-tensors produces itself.

On the CPU a weight is quantized in row chunks that stay in cache, spread
over one single-threaded worker per core, and the common schemes (FP8, INT4
packed, NVFP4) take shorter routes to the same bytes than compressed-tensors'
own CPU code (routes.py). No Prefect and no I/O here: `ptqflow plan` imports
this module for output shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from storage.safetensors import DTYPE_NAMES, DTYPES
from tasks.core.devices import limit_malloc_arenas, usable_cpus
from tasks.core.quant.observers import observe, search_of, searched_minmax
from tasks.core.quant.routes import Tensors, compress_function

__all__ = [
    "CHUNK_ELEMENTS",
    "SEARCH_TERMS",
    "Tensors",
    "meta_outputs",
    "quantize_weights",
    "row_chunks",
    "scale_dtype",
    "searched",
]

# Elements per row chunk: a chunk's input and intermediates stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 20
# Values times steps of an MSE search's run of groups (16 MiB of error terms per worker):
# fewer, larger runs spend less time in Python between the compiled loops.
SEARCH_TERMS = 1 << 23


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


def _outputs(weight: torch.Tensor, scheme, shared: set[str]) -> Tensors:
    """The per-row tensors of `weight`'s compressed state dict, allocated once with the
    shapes the whole weight gives on the meta device, for its row chunks to fill."""
    layout = _layout(tuple(weight.shape), DTYPE_NAMES[weight.dtype], scheme.model_dump_json())
    return {
        key: torch.empty(shape, dtype=DTYPES[dtype], device=weight.device)
        for key, (dtype, shape) in layout.items()
        if key not in shared and key != "weight_shape"
    }


def _join(pieces: Iterable[Tensors], shared: set[str], weight: torch.Tensor, out: Tensors):
    """One compressed state dict from those of consecutive row chunks, filled as they come:
    `shared` keys (global or per-tensor scale) come back unchanged, `weight_shape` is the
    original shape, and per-row tensors are copied into their rows of `out` (`_outputs`), if
    the chunk did not write them there, so each chunk's piece is freed once copied."""
    out, filled = dict(out), dict.fromkeys(out, 0)
    for piece in pieces:
        for key, part in piece.items():
            if key in shared:
                out.setdefault(key, part)
            elif key == "weight_shape":
                out.setdefault(key, torch.tensor(weight.shape, dtype=part.dtype))
            else:
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
    if rows.data_ptr() == part.data_ptr() and rows.shape == part.shape:
        return  # written in place (_compress_rows' `into`)
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


def _global_scale(ranges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The TENSOR_GROUP (NVFP4) global scale shared by weights observed as (min, max) `ranges`.

    As llm-compressor fuses it: from the largest magnitude of all the members'
    observed ranges (after an MSE search, the searched ones).
    """
    from compressed_tensors.quantization.utils import generate_gparam

    absmax = None
    for lo, hi in ranges:
        m = torch.max(-lo.min(), hi.max())
        absmax = m if absmax is None else torch.max(absmax, m)
    return generate_gparam(-absmax.reshape(1), absmax.reshape(1))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One thread per usable CPU for row chunks, each running torch's ops on itself alone.

    Small ops split over torch's OpenMP threads end in a barrier each; on a
    busy machine one descheduled thread stalls the others at every op, which
    made chunked quantization several times slower than on one thread.
    Chunks on separate single-threaded workers never wait for each other.
    (torch.set_num_threads in a worker sets that thread's OpenMP team size,
    and the default for threads that have not run a parallel op yet.)
    """
    limit_malloc_arenas()
    return ThreadPoolExecutor(
        usable_cpus(),
        thread_name_prefix="ptqflow-quantize",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )


def _compress_rows(
    weight, r0: int, r1: int, *, args, compress, whole: dict, ranges, outputs: Tensors
) -> Tensors:
    """Compressed state dict of rows [r0, r1) of `weight`.

    `whole` holds parameters computed on the whole weight (global scale, or
    the per-tensor scale and zero point); everything else comes from the
    chunk's own min and max: those of its rows in the whole weight, or their
    rows of `ranges`, the whole weight's searched (min, max). The quantized
    values are written straight into their rows of `outputs` where a route can:
    an output of the chunk's own would cost fresh pages (a fault per 4 KiB) and a copy.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams

    part = weight[r0:r1]
    state = {"weight": part, **whole}
    if "weight_scale" not in whole:
        if ranges is None:
            lo, hi = observe(part, args)
        else:
            bh = args.block_structure[0] if args.strategy == S.BLOCK else 1
            lo, hi = (t[r0 // bh : -(-r1 // bh)] for t in ranges)
        scale, zero_point = calculate_qparams(
            lo, hi, args, global_scale=whole.get("weight_global_scale")
        )
        state["weight_scale"] = scale.to(scale_dtype(weight.dtype))
        if not args.symmetric:
            state["weight_zero_point"] = zero_point.to(args.zp_dtype)
    into = outputs.get("weight", outputs.get("weight_packed"))
    return compress(state, None if into is None else into[r0:r1])


def searched(weight: torch.Tensor, args, search) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per scale element after an MSE observer's search, runs of groups on the pool."""
    from compressed_tensors.quantization import QuantizationStrategy as S

    if weight.device.type != "cpu" or args.strategy == S.TENSOR:  # one group: torch's threads
        return searched_minmax(weight, args, search)
    return searched_minmax(weight, args, search, _pool().map, SEARCH_TERMS)


@torch.no_grad()
def quantize_weights(
    weights: list[torch.Tensor], scheme, chunk_elements: int = CHUNK_ELEMENTS
) -> list[Tensors]:
    """Compressed state dicts (local names: weight_packed, weight_scale, ...) of `weights`.

    The weights share one global scale when the scheme has one (NVFP4): pass
    all members of a fused set together. Each weight is observed (min-max, or
    the scheme's MSE search over the whole weight), then quantized and
    compressed in row chunks of about `chunk_elements` elements, which gives
    the bytes compressed-tensors gives for the whole weight.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    compress = compress_function(scheme)
    search = search_of(args.observer, args.observer_kwargs)
    ranges = [searched(w, args, search) if search and not w.is_meta else None for w in weights]
    whole = {}
    if args.strategy == S.TENSOR_GROUP:
        observed = [r or torch.aminmax(w) for r, w in zip(ranges, weights, strict=True)]
        whole["weight_global_scale"] = _global_scale(observed).to(torch.float32)
    out = []
    for w, found in zip(weights, ranges, strict=True):
        shared = dict(whole)
        if args.strategy == S.TENSOR:
            scale, zero_point = calculate_qparams(*(found or observe(w, args)), args)
            shared["weight_scale"] = scale.to(scale_dtype(w.dtype))
            if not args.symmetric:
                shared["weight_zero_point"] = zero_point.to(args.zp_dtype)
        chunks = row_chunks(w, args, chunk_elements)
        outputs = {} if len(chunks) == 1 else _outputs(w, scheme, set(shared))
        rows = functools.partial(
            _compress_rows,
            w,
            args=args,
            compress=compress,
            whole=shared,
            ranges=found,
            outputs=outputs,
        )
        if len(chunks) == 1:
            out.append(rows(*chunks[0]))
            continue
        parallel = _pool().map if w.device.type == "cpu" else map
        pieces = parallel(lambda c, rows=rows: rows(*c), chunks)
        out.append(_join(pieces, set(shared), w, outputs))
    return out


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
