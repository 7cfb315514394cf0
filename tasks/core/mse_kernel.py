"""The MSE search's per-element arithmetic for bfloat16 weights on the CPU, compiled by numba.

For each group and step it computes what torch computes with a dozen passes
over the weight: y = x / scale, (+ zero point), clamp, round onto the grid,
(- zero point), * scale, - x, |.| ** norm, summed. Every bfloat16 operation of
torch is a float32 operation rounded to nearest-even bfloat16, and so is each
one here; the functions of one bfloat16 value that torch computes with its
own libraries (`pow`, the FP8 cast) are tables that torch itself fills, and
torch sums each group (its summation order decides the last bit of a sum), so
every error is torch's to the bit (tests/test_observers.py).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

INT, FP8, FP4 = 0, 1, 2
_HIGH = np.uint32(0xFFFF0000)


def handles(x: torch.Tensor) -> bool:
    """Whether this kernel computes x's errors: finite bfloat16 on the CPU."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and bool(torch.isfinite(x).all())


@functools.cache
def _tables(norm: float) -> tuple[np.ndarray, np.ndarray]:
    """|d| ** norm (bfloat16 bits) and the FP8 round trip (float32), for every bfloat16 value."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    power = every.abs().pow(norm).view(torch.int16).numpy().view(np.uint16)
    fp8 = every.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.bfloat16).float().numpy()
    return power, fp8


def errors(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args, norm: float):
    """Errors (steps, groups) as bfloat16 of values (groups, values), as observers._error's."""
    from compressed_tensors.quantization.utils import calculate_range

    lo, hi = (float(v) for v in calculate_range(args, x.device))
    kind = INT if args.type == "int" else FP8 if args.num_bits == 8 else FP4
    values = x.float().numpy()
    scales, zeros = scale.float().numpy(), zero.float().numpy()
    terms = np.empty((len(scales), *values.shape), dtype=np.uint16)
    power, fp8 = _tables(norm)
    _terms(values, scales, zeros, kind, not args.symmetric, lo, hi, power, fp8, terms)
    return torch.from_numpy(terms.view(np.int16)).view(torch.bfloat16).sum(dim=-1)


@intrinsic
def _bits(typingctx, x):
    """The bits of a float32, as a uint32 (a register bitcast)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, b):
    """The float32 whose bits are b."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(inline="always")
def _bf16(v):
    """v rounded to the nearest-even bfloat16, as torch rounds a float32 result."""
    b = _bits(v)
    return _float((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & _HIGH)


@numba.njit(inline="always")
def _clamp(y, lo, hi):
    y = y if y > lo else lo
    return y if y < hi else hi


@numba.njit(inline="always")
def _fp4(y):
    """compressed-tensors' cast_to_fp4 of a float32: E2M1 magnitudes, ties to even codes."""
    a = abs(y)
    m = np.float32(0.0)
    m = np.float32(0.5) if a > np.float32(0.25) else m
    m = np.float32(1.0) if a >= np.float32(0.75) else m
    m = np.float32(1.5) if a > np.float32(1.25) else m
    m = np.float32(2.0) if a >= np.float32(1.75) else m
    m = np.float32(3.0) if a > np.float32(2.5) else m
    m = np.float32(4.0) if a >= np.float32(3.5) else m
    m = np.float32(6.0) if a > np.float32(5.0) else m
    return -m if y < np.float32(0.0) else m


@numba.njit(nogil=True, cache=True)
def _terms(values, scales, zeros, kind, asym, lo, hi, power, fp8, terms):
    """terms[i, j, k] = bits of |fake_quant(x) - x| ** norm, step i, group j, value k.

    Every float32 result is rounded to bfloat16 where torch's bfloat16
    operation rounds it. A symmetric zero point is 0: adding and subtracting
    it changes no value but the sign of a zero, which the error does not see.
    The arithmetic of a group is one vectorized loop; the table lookups of
    |d| ** norm, which do not vectorize, a second.
    """
    n, g = values.shape
    lo32, hi32 = np.float32(lo), np.float32(hi)
    shift = np.uint32(16)
    for i in range(scales.shape[0]):
        for j in range(n):
            x, s, z, out = values[j], scales[i, j], zeros[i, j], terms[i, j]
            if kind == INT and not asym:
                for k in range(g):
                    y = np.float32(np.rint(_clamp(_bf16(x[k] / s), lo32, hi32)))
                    out[k] = np.uint16(_bits(_bf16(_bf16(y * s) - x[k])) >> shift)
            elif kind == INT:
                for k in range(g):
                    y = _clamp(_bf16(_bf16(x[k] / s) + z), lo32, hi32)
                    d = _bf16(_bf16((np.float32(np.rint(y)) - z) * s) - x[k])
                    out[k] = np.uint16(_bits(d) >> shift)
            elif kind == FP4:
                for k in range(g):
                    y = _clamp(_bf16(_bf16(x[k] / s) + z), lo32, hi32)
                    d = _bf16(_bf16((_fp4(y) - z) * s) - x[k])
                    out[k] = np.uint16(_bits(d) >> shift)
            else:
                for k in range(g):
                    y = _clamp(_bf16(_bf16(x[k] / s) + z), lo32, hi32)
                    out[k] = np.uint16(_bits(y) >> shift)
                for k in range(g):
                    d = _bf16(_bf16((fp8[out[k]] - z) * s) - x[k])
                    out[k] = np.uint16(_bits(d) >> shift)
            for k in range(g):
                out[k] = power[out[k]]
