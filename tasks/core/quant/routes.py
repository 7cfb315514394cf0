"""Shorter routes to compressed-tensors' bytes: `compress_function`.

compressed-tensors' CPU path converts and copies more than its result needs:
clamps with tensor bounds (a slow broadcast), rounds FP8 through the weight's
dtype and back (an unvectorized conversion), and packs INT4 by scatter-adds.
These routes do the same arithmetic on the same operands in fewer passes, and
for bfloat16 weights on the CPU in one compiled pass (code_kernel.py);
tests/test_quantize_speed.py checks them against compressed-tensors on every
bf16 and fp16 quotient value and on whole weights with edge values.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from tasks.core.quant.geometry import kernel_handles
from tasks.core.quant.kinds import FP4, FP8, INT, QuantKind, fp4_codes, kind_of, scheme_format

__all__ = ["Tensors", "compress_function"]

Tensors = dict[str, torch.Tensor]


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
    code = fp4_codes(q.abs()).add_((q < 0).to(torch.uint8).mul_(8))
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
