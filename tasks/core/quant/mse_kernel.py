"""The MSE search's per-element arithmetic for bfloat16 weights on the CPU, compiled by numba.

For each group and step it computes what torch computes with a dozen passes
over the weight: y = x / scale, (+ zero point), clamp, round onto the grid,
(- zero point), * scale, - x, |.| ** norm, summed. Every bfloat16 operation of
torch is a float32 operation rounded to nearest-even bfloat16, and so is each
one here; the functions of one bfloat16 value that torch computes with its
own libraries (`pow`, the FP8 cast) are tables that torch itself fills, and
each group's sum is torch's (see `search`), so every error is torch's to the
bit (tests/test_observers.py).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from tasks.core.quant.bits import bf16, bits
from tasks.core.quant.kinds import FP4, FP8, INT, QuantKind

__all__ = ["FUSED_VALUES", "KINDS", "errors", "handles", "search"]

# the kinds of quantizer the loops are compiled for, and their constants in them
KINDS = (INT, FP8, FP4)
_INT, _FP4 = INT.code, FP4.code
# groups of up to this many values are summed in the kernel (`search`); in larger ones (channels,
# blocks) the bound on torch's rounding leaves too many sums unsure, and torch sums them all
FUSED_VALUES = 256


def handles(x: torch.Tensor, kind: QuantKind) -> bool:
    """Whether this kernel computes x's errors: finite bfloat16 on the CPU, of a kind it has."""
    return (
        kind in KINDS
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and bool(torch.isfinite(x).all())
    )


@functools.cache
def _tables(norm: float) -> tuple[np.ndarray, np.ndarray]:
    """|d| ** norm and the FP8 round trip (bfloat16 values as float32), for every bfloat16 value."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    power = every.abs().pow(norm).float().numpy()
    fp8 = every.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.bfloat16).float().numpy()
    return power, fp8


def errors(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args, kind, norm: float):
    """Errors (steps, groups) as bfloat16 of values (groups, values), as observers' torch
    errors: every term computed here, each group summed by torch."""
    quantizer, values, scales, zeros = _operands(x, scale, zero, args, kind, norm)
    terms = np.empty((len(scales), *values.shape), dtype=np.uint16)
    _terms(values, scales, zeros, *quantizer, terms)
    return _summed(terms)


def search(x, scale, zero, args, kind, norm: float, best, step, first: int):
    """observers.advance(errors(x, scale, zero, args, kind, norm), best, step, first), fused,
    for the groups whose errors it is sure of. Returns (improved, groups, unsure): whether
    one of those improved at each step, and the other groups with their errors (steps,
    groups), for observers to advance.

    A group's error is torch's float32 sum of its terms rounded to bfloat16, and
    torch's summation order decides the last float32 bits. Any order's float32
    sum of n positive terms is within (n - 1) * 2**-24 of the exact sum, so the
    kernel's own (in the order that vectorizes) is within 2 * (n + 4) * 2**-24 of
    torch's. Where every float32 in that interval rounds to the same finite
    bfloat16, that is torch's error; where not (about 1 in 1,000 errors of 16
    values, 1 in 200 of 128), torch sums the terms, and torch's advance takes
    those groups. Groups of more than FUSED_VALUES values are not for it.
    """
    quantizer, values, scales, zeros = _operands(x, scale, zero, args, kind, norm)
    code, asym, lo, hi, power, fp8 = quantizer
    sums = np.empty(scales.shape[::-1], dtype=np.float32)  # (groups, steps): a group's adjacent
    improved = np.zeros(len(scales), dtype=np.bool_)
    pending = np.zeros(len(values), dtype=np.bool_)
    lowest = best.float().numpy()
    kernel = _search(code, asym)
    kernel(
        values,
        scales,
        zeros,
        lo,
        hi,
        power,
        fp8,
        lowest,
        step.numpy(),
        first,
        improved,
        pending,
        sums,
    )
    best.copy_(torch.from_numpy(lowest))
    groups = np.flatnonzero(pending)
    unsure = sums[groups]
    g, i = np.nonzero(np.isnan(unsure))
    if len(g):
        terms = np.empty((1, len(g), values.shape[1]), dtype=np.uint16)
        at = groups[g]
        _terms(values[at], scales[i, at][None], zeros[i, at][None], *quantizer, terms)
        unsure[g, i] = _summed(terms)[0].float().numpy()
    unsure = torch.from_numpy(unsure.T).to(best.dtype)
    return torch.from_numpy(improved), torch.from_numpy(groups), unsure


def _operands(x, scale, zero, args, kind: QuantKind, norm: float):
    """The kernels' quantizer (kind, asymmetric, range, tables) and float32 arrays."""
    from compressed_tensors.quantization.utils import calculate_range

    lo, hi = (float(v) for v in calculate_range(args, x.device))
    quantizer = (kind.code, not args.symmetric, lo, hi, *_tables(norm))
    return quantizer, x.float().numpy(), scale.float().numpy(), zero.float().numpy()


def _summed(terms: np.ndarray) -> torch.Tensor:
    """torch's bfloat16 sums over the last axis of terms (bfloat16 bits)."""
    return torch.from_numpy(terms.view(np.int16)).view(torch.bfloat16).sum(dim=-1)


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


@numba.njit(inline="always")
def _differences(x, s, z, kind, asym, lo, hi, fp8, out):
    """out[k] = bfloat16 bits of fake_quant(x[k]) - x[k], rounded where torch rounds.

    A symmetric zero point is 0: adding and subtracting it changes no value but
    the sign of a zero, which the error does not see. Each kind is one loop
    that vectorizes, but for the FP8 round trip's table lookups.
    """
    lo32, hi32, shift = np.float32(lo), np.float32(hi), np.uint32(16)
    if kind == _INT and not asym:
        for k in range(len(x)):
            y = np.float32(np.rint(_clamp(bf16(x[k] / s), lo32, hi32)))
            out[k] = np.uint16(bits(bf16(bf16(y * s) - x[k])) >> shift)
    elif kind == _INT:
        for k in range(len(x)):
            y = _clamp(bf16(bf16(x[k] / s) + z), lo32, hi32)
            d = bf16(bf16((np.float32(np.rint(y)) - z) * s) - x[k])
            out[k] = np.uint16(bits(d) >> shift)
    elif kind == _FP4 and not asym:
        for k in range(len(x)):
            y = _clamp(bf16(x[k] / s), lo32, hi32)
            out[k] = np.uint16(bits(bf16(bf16(_fp4(y) * s) - x[k])) >> shift)
    elif kind == _FP4:
        for k in range(len(x)):
            y = _clamp(bf16(bf16(x[k] / s) + z), lo32, hi32)
            d = bf16(bf16((_fp4(y) - z) * s) - x[k])
            out[k] = np.uint16(bits(d) >> shift)
    else:
        for k in range(len(x)):
            y = _clamp(bf16(bf16(x[k] / s) + z), lo32, hi32)
            out[k] = np.uint16(bits(y) >> shift)
        for k in range(len(x)):
            d = bf16(bf16((fp8[out[k]] - z) * s) - x[k])
            out[k] = np.uint16(bits(d) >> shift)


@numba.njit(nogil=True, cache=True)
def _terms(values, scales, zeros, kind, asym, lo, hi, power, fp8, terms):
    """terms[i, j, k] = bits of |fake_quant(x) - x| ** norm, step i, group j, value k."""
    for i in range(scales.shape[0]):
        for j in range(values.shape[0]):
            out = terms[i, j]
            _differences(values[j], scales[i, j], zeros[i, j], kind, asym, lo, hi, fp8, out)
            for k in range(len(out)):
                out[k] = np.uint16(bits(power[out[k]]) >> np.uint32(16))


@functools.cache
def _search(kind: int, asym: bool):
    """The search kernel for one kind of quantizer, its code a constant in it (a branch on
    it in the loop makes the loop 1.8x slower).

    It computes sums[j, i], the error of group j at step i, or NaN where unsure.
    A group with none unsure goes through its steps as observers.advance does:
    best[j] and step[j] follow strictly smaller errors, and improved[i] is set
    where one is. A group with one is left for torch, marked in pending.
    """

    @numba.njit(nogil=True, cache=True)
    def kernel(
        values, scales, zeros, lo, hi, power, fp8, best, step, first, improved, pending, sums
    ):
        n = values.shape[1]
        slack = 2 * (n + 4) * 2.0**-24
        buffer = np.empty(n, dtype=np.uint16)
        for j in range(values.shape[0]):
            x, sure = values[j], True
            for i in range(len(scales)):
                if i and scales[i, j] == scales[i - 1, j] and zeros[i, j] == zeros[i - 1, j]:
                    sums[j, i] = sums[j, i - 1]  # the same candidate: the same error
                    continue
                _differences(x, scales[i, j], zeros[i, j], kind, asym, lo, hi, fp8, buffer)
                total = _total(buffer, power)
                low = bf16(np.float32(total * (1.0 - slack)))
                high = bf16(np.float32(total * (1.0 + slack)))
                known = low == high and low < np.inf
                sure = sure and known
                sums[j, i] = low if known else np.nan
            if not sure:
                pending[j] = True
                continue
            for i in range(len(scales)):
                if sums[j, i] < best[j]:
                    best[j], step[j], improved[i] = sums[j, i], first + i, True

    return kernel


@numba.njit(fastmath={"reassoc"})
def _total(codes, power):
    """The float32 sum of the terms power[codes], in whatever order vectorizes."""
    total = np.float32(0.0)
    for b in codes:
        total += power[b]
    return total
