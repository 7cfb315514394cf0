"""The bits of float32 and bfloat16 values inside numba-compiled loops: register bitcasts,
and rounding a float32 to bfloat16 as torch rounds every bfloat16 result."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = ["bf16", "bits", "float_of"]

_HIGH = np.uint32(0xFFFF0000)


@intrinsic
def bits(typingctx, x):
    """The bits of a float32, as a uint32 (a register bitcast)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def float_of(typingctx, b):
    """The float32 whose bits are b."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(inline="always")
def bf16(v):
    """v rounded to the nearest-even bfloat16, as torch rounds a float32 result."""
    b = bits(v)
    return float_of((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & _HIGH)
