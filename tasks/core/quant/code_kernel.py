"""FP8, INT4 and NVFP4 codes of a bfloat16 weight on the CPU, and its min and max per scale
element, each in one pass compiled by numba.

compressed-tensors' routes (compress.py's shorter ones too) divide x by its
scale, clamp the quotient q and convert, round or compare it: four to eleven
passes over the weight, one of them an unvectorized conversion. For FP8 and
INT4, q is a bfloat16 (a float32 division rounded to nearest-even) and all
that follows is a function of its 16 bits, so torch itself fills a table of it
for every bfloat16 value, and the kernel divides as torch does and looks the
code up; NVFP4's q is the float32 quotient, counted against the FP4 boundaries.
The same bytes (tests/test_quantize_speed.py checks every quotient), 1.5 to 2.5
times as fast on whole weights. Min and max (`extremes`) are exact in any
order, so any order that vectorizes gives them."""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from tasks.core.quant.bits import bf16, bits, float_of
from tasks.core.quant.geometry import kernel_handles, scale_extent
from tasks.core.quant.kinds import FP4, FP8, INT, QuantKind

__all__ = ["BITS", "codes", "codes_of", "extremes", "handles", "table"]

# the kinds of quantizer the kernel codes, and the width of their codes: 4-bit codes are
# packed two to a byte
BITS = {FP8: 8, INT: 4, FP4: 4}


def codes_of(x, scale, args, kind: QuantKind, into=None) -> torch.Tensor | None:
    """`codes` of x under `args`' scale elements, written into `into` (x's rows of the whole
    weight's output) when given; None where the kernel does not take x and scale."""
    extent = BITS.get(kind) == args.num_bits and handles(x, scale, kind) and scale_extent(x, args)
    return codes(x, scale, *extent, kind, into) if extent else None


def handles(x: torch.Tensor, scale: torch.Tensor, kind: QuantKind) -> bool:
    """Whether the kernel computes x's codes: x as geometry.kernel_handles takes it, a
    bfloat16 scale (FP4: the float32 divisor scale / global scale), every one finite and
    nonzero (so no quotient of a finite x is NaN)."""
    return (
        kernel_handles(x)
        and scale.dtype == (torch.float32 if kind is FP4 else torch.bfloat16)
        and bool(torch.isfinite(scale).all() and scale.all())
    )


@functools.cache
def table(kind: QuantKind) -> np.ndarray:
    """The code of every bfloat16 quotient q (indexed by its bits), as torch computes it:
    FP8: clamp(q, -448, 448) -> float8_e4m3fn; INT (4 bits): round(clamp(q, -8, 7)) + 8."""
    q = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    if kind is FP8:
        from compressed_tensors.quantization.quant_args import FP8_E4M3_DATA

        codes = q.clamp(FP8_E4M3_DATA.min, FP8_E4M3_DATA.max).to(FP8_E4M3_DATA.dtype)
        return codes.view(torch.uint8).numpy()
    # a quotient can overflow to infinity, but is never NaN (the scale is finite and nonzero)
    q = torch.where(torch.isnan(q), 0, q)
    return q.clamp(-8, 7).round().add(8).to(torch.uint8).numpy()


def codes(
    x: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, kind: QuantKind, into=None
) -> torch.Tensor:
    """The codes of x (FP8 bytes, or INT4 or FP4 codes packed two to a byte, the even column
    in the low nibble), where scale[i, j] scales x[i * rows : (i + 1) * rows, j * cols : ...]:
    `into` (a contiguous tensor of those bytes), or a new uint8 tensor."""
    values = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    scales = scale.reshape(-(-x.shape[0] // rows), -1).float().numpy()
    packed = BITS[kind] == 4
    shape = (x.shape[0], x.shape[1] // 2 if packed else x.shape[1])
    out = torch.empty(shape, dtype=torch.uint8) if into is None else into
    target = out.view(torch.uint8).view(shape).numpy()
    lookup = table(INT if kind is FP4 else kind)  # FP4 looks nothing up
    _codes(values, scales, rows, cols, lookup, kind is FP4, packed, target)
    return out


@numba.njit(nogil=True, cache=True)
def _codes(values, scales, rows, cols, lookup, fp4, packed, out):
    n = values.shape[1]
    quotients = np.empty(n, dtype=np.uint16)
    codes = np.empty(n, dtype=np.uint8)
    for r in range(values.shape[0]):
        x, s, o = values[r], scales[r // rows], out[r]
        for j in range(len(s)):  # slices: each segment's loop vectorizes
            start, stop = j * cols, min(j * cols + cols, n)
            if fp4:
                _fp4(x[start:stop], s[j], codes[start:stop])
            else:
                _divide(x[start:stop], s[j], quotients[start:stop])
        found = codes if packed else o
        if not fp4:  # the table lookups, which do not vectorize, in a loop of their own
            for c in range(n):
                found[c] = lookup[quotients[c]]
        if packed:
            for k in range(n // 2):
                o[k] = codes[2 * k] | (codes[2 * k + 1] << np.uint8(4))


@numba.njit(inline="always")
def _divide(x, d, out):
    """out = bits of bfloat16(x / d), x as bfloat16 bits: torch's bfloat16 division."""
    shift = np.uint32(16)
    for c in range(len(x)):
        out[c] = np.uint16(bits(bf16(float_of(np.uint32(x[c]) << shift) / d)) >> shift)


@numba.njit(inline="always")
def _fp4(x, d, out):
    """routes._fp4_packed's codes: the float32 quotient x / d (not rounded), clamped to
    +-6, coded by the FP4 boundaries below its magnitude, plus 8 for a negative one."""
    for c in range(len(x)):
        q = float_of(np.uint32(x[c]) << np.uint32(16)) / d
        q = max(min(q, np.float32(6.0)), np.float32(-6.0))
        a = abs(q)
        out[c] = (
            np.uint8(8 if q < 0 else 0)
            + np.uint8(a > 0.25)
            + np.uint8(a >= 0.75)
            + np.uint8(a > 1.25)
            + np.uint8(a >= 1.75)
            + np.uint8(a > 2.5)
            + np.uint8(a >= 3.5)
            + np.uint8(a > 5.0)
        )


def extremes(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Min and max (bfloat16) of each rows x cols block of the bfloat16 matrix x, whose shape
    the blocks tile, in one pass (torch's reductions of strided views take twice as long);
    None where x holds a NaN, whose bits in torch's result depend on torch's code path.
    A zero comes back as +0.0: its sign reaches no scale or zero point."""
    values = x.contiguous().view(torch.int16).numpy().view(np.uint16)
    shape = (x.shape[0] // rows, x.shape[1] // cols)
    lo, hi = np.full(shape, 0x7FFF, np.int32), np.full(shape, -0x7FFF, np.int32)
    if _extremes(values, rows, cols, lo, hi) > 0x7F80:
        return None
    return tuple(torch.from_numpy(_bits16(t)).view(torch.bfloat16) for t in (lo, hi))


def _bits16(keys: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as int16) of _extremes' keys."""
    return np.where(keys < 0, (-keys) | 0x8000, keys).astype(np.uint16).view(np.int16)


@numba.njit(nogil=True, cache=True)
def _extremes(values, rows, cols, lo, hi):
    """lo, hi = the least and greatest keys of each block, where a bfloat16's key is its
    magnitude bits, negated for a negative value: integers, ordered as the values (but
    -0.0 = +0.0), whose min and max vectorize. Returns the greatest magnitude bits (above
    0x7F80: a NaN)."""
    top = np.int32(0)
    for r in range(values.shape[0]):
        x, low, high = values[r], lo[r // rows], hi[r // rows]
        for j in range(len(low)):
            low[j], high[j], m = _keys(x[j * cols : j * cols + cols], low[j], high[j])
            top = max(top, m)
    return top


@numba.njit(inline="always")
def _keys(x, a, b):
    """The least and greatest keys of x, a and b, and x's greatest magnitude bits."""
    top = np.int32(0)
    for k in range(len(x)):
        v = np.int32(x[k])
        m = v & 0x7FFF
        key = m if v < 0x8000 else -m
        a = key if key < a else a
        b = key if key > b else b
        top = m if m > top else top
    return a, b, top
