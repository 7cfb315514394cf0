"""Quantize and compress weights: the bytes compressed-tensors would produce, faster.

Quantization parameters are computed exactly as llm-compressor's min-max weight
observer does (same reshapes, same dtypes), then compressed-tensors' own
`calculate_qparams`, `generate_gparam` and compressor classes produce the
stored tensors, so the bytes are those compressed-tensors produces itself.

On the CPU a weight is quantized in row chunks that stay in cache, spread
over one single-threaded worker per core, and the common schemes (FP8, INT4
packed, NVFP4) take shorter routes to the same bytes than compressed-tensors'
own CPU code; tests/test_quantize_speed.py holds the proofs. No Prefect and no
I/O here: `ptqflow plan` imports this module for output shapes.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from storage.safetensors import DTYPE_NAMES, DTYPES
from tasks.core.devices import limit_malloc_arenas, usable_cpus
from tasks.core.quant.geometry import kernel_handles
from tasks.core.quant.kinds import FP4, FP4_STEPS, FP8, INT, QuantKind, kind_of, scheme_format
from tasks.core.quant.observers import observe, search_of, searched_minmax

__all__ = [
    "CHUNK_ELEMENTS",
    "Tensors",
    "compress_function",
    "meta_outputs",
    "quantize_weights",
    "row_chunks",
    "scale_dtype",
    "searched",
]

Tensors = dict[str, torch.Tensor]

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


def _kernel_codes(x, scale, args, kind: QuantKind, into) -> torch.Tensor | None:
    """code_kernel.py's codes, where it takes x (imported only then: numba)."""
    if not kernel_handles(x):
        return None
    from tasks.core.quant.code_kernel import codes_of

    return codes_of(x, scale, args, kind, into)


def _fp8_weight(x: torch.Tensor, scale: torch.Tensor, args, into=None) -> torch.Tensor:
    """compressed-tensors' FP8 weight: clamp(x / scale) -> fp8 -> x.dtype -> fp8.

    With finite operands the quotient is finite: clamping with Python-number
    bounds gives what tensor bounds give, and the round trip through x.dtype
    returns every finite fp8 value unchanged, so one in-place clamp and one
    conversion remain.
    """
    from compressed_tensors.quantization.quant_args import FP8_E4M3_DATA

    codes = _kernel_codes(x, scale, args, FP8, into)
    if codes is not None:
        return codes.view(FP8_E4M3_DATA.dtype)
    q = _divide(x, scale, args)
    return q.clamp_(FP8_E4M3_DATA.min, FP8_E4M3_DATA.max).to(FP8_E4M3_DATA.dtype)


def _int4_packed(x: torch.Tensor, scale: torch.Tensor, args, into=None) -> torch.Tensor:
    """pack_to_int32(round(clamp(x / scale, -8, 7)), 4) for rows of a multiple of 8 values.

    pack_to_int32 puts value k of each run of 8 (offset by 8) at bits 4k of an
    int32; on a little-endian host that is byte k // 2, low nibble for even k.
    """
    packed = _kernel_codes(x, scale, args, INT, into)
    if packed is None:
        q = _divide(x, scale, args).clamp_(-8, 7).round_().add_(8).to(torch.uint8)
        pairs = q.view(q.shape[0], -1, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed.view(torch.int32)


def _fp4_packed(x, scale: torch.Tensor, global_scale: torch.Tensor, args, into=None):
    """quantize_and_pack_fp4(x, scale, global_scale) where scale / global_scale is finite, not 0.

    compressed-tensors clamps x / (scale / global_scale) to [-6, 6], rounds it
    to FP4 with 8 masked writes, then recovers each FP4 code from the rounded
    value with 8 more. The code is the number of boundaries below |x| (ties
    rounding to the even code), plus 8 for x < 0 (a value that rounds to zero
    keeps its sign, an exact -0.0 does not: torch.sign(-0.0) is 0).
    """
    divisor = scale / global_scale
    packed = _kernel_codes(x, divisor, args, FP4, into)
    if packed is not None:
        return packed
    q = _divide(x, divisor, args).clamp_(-6.0, 6.0)
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

    args, fmt, kind = scheme.weights, scheme_format(scheme), kind_of(scheme.weights)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    fp8 = (
        kind is FP8
        and fmt in ("float-quantized", "naive-quantized")
        and args.strategy in (S.TENSOR, S.CHANNEL, S.BLOCK)
    )
    int4 = (
        kind is INT
        and args.num_bits == 4
        and fmt == "pack-quantized"
        and args.strategy in (S.CHANNEL, S.GROUP)
    )
    fp4 = kind is FP4 and fmt == "nvfp4-pack-quantized" and args.strategy == S.TENSOR_GROUP
    shortcut = (fp8 or int4 or fp4) and args.symmetric and sys.byteorder == "little"

    def compress(state: Tensors, into: torch.Tensor | None = None) -> Tensors:
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
            out["weight"] = _fp8_weight(w, scale, args, into)
        elif int4:
            out["weight_packed"] = _int4_packed(w, scale, args, into)
            out["weight_shape"] = torch.tensor(w.shape)
        else:
            out["weight_packed"] = _fp4_packed(
                w, state["weight_scale"], state["weight_global_scale"], args, into
            )
            del out["weight_scale"]  # stored as the compressor stores it, after the weight
            out["weight_scale"] = compressor._compress_scale(state["weight_scale"], args)
        return out

    return compress


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
