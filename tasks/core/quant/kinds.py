"""What a scheme's weights are, read from compressed-tensors' QuantizationArgs in one place.

A `QuantKind` is the grid quantized values lie on: integers ("int", any width),
FP8 E4M3 ("fp8") or FP4 E2M1 ("fp4"). Each kind is registered here with the
arguments it takes and how torch puts a quotient onto its grid; `kind_of` is the
one place arguments are read for it. The MSE search and the compiled kernels
dispatch on it, and compress's shorter routes are for some kinds only; arguments
of no registered kind (MXFP6's 6-bit floats) are quantized by compressed-tensors'
own compressors from their min and max, and refused by the search
(`search_kind`), never searched on another kind's grid.

A new kind: a `QuantKind` subclass registered below; the kernels and compress's
shorter routes leave it to torch and compressed-tensors until they learn it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from storage.errors import PtqflowError
from tasks.core.registry import Registry

__all__ = [
    "FP4",
    "FP4_MAGNITUDES",
    "FP4_STEPS",
    "FP8",
    "INT",
    "QuantKind",
    "fp4_codes",
    "fp4_values",
    "kind_of",
    "scheme_format",
    "search_kind",
]


class QuantKind(Registry):
    """The grid of one kind of quantizer, for QuantizationArgs of `type` and `bits`."""

    what = "quantizer kind"
    type: ClassVar[str]  # QuantizationArgs.type it takes
    bits: ClassVar[int | None] = None  # QuantizationArgs.num_bits it takes; None: any
    code: ClassVar[int]  # the compiled kernels' constant for it

    def onto(self, y: torch.Tensor) -> torch.Tensor:
        """y, clamped to the arguments' range, on the grid as compressed-tensors'
        fake_quantize puts it (in y's dtype; may be y itself, changed in place)."""
        raise NotImplementedError


@QuantKind.register("int")
class Integers(QuantKind):
    type, code = "int", 0

    def onto(self, y: torch.Tensor) -> torch.Tensor:
        return y.round_()


@QuantKind.register("fp8")
class Fp8(QuantKind):
    type, bits, code = "float", 8, 1

    def onto(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(torch.float8_e4m3fn).to(y.dtype)


@QuantKind.register("fp4")
class Fp4(QuantKind):
    type, bits, code = "float", 4, 2

    def onto(self, y: torch.Tensor) -> torch.Tensor:
        return fp4_values(y)


INT, FP8, FP4 = (QuantKind.get(name) for name in ("int", "fp8", "fp4"))


def kind_of(args) -> QuantKind | None:
    """The kind of quantizer of QuantizationArgs `args`, or None for a kind not registered."""
    for kind in QuantKind.registered():
        if kind.type == args.type and kind.bits in (None, args.num_bits):
            return kind
    return None


def search_kind(args) -> QuantKind:
    """The kind of `args` for the MSE search, which has only the registered kinds' grids;
    a PtqflowError naming the others."""
    kind = kind_of(args)
    if kind is None:
        have = ", ".join(f"{k.type}{k.bits or ''}" for k in QuantKind.registered())
        raise PtqflowError(
            f"the MSE search has no grid for {args.num_bits}-bit {args.type} weights (it has "
            f"{have}); use a min-max observer"
        )
    return kind


# Round-to-nearest-even boundaries of |x| between the FP4 (E2M1) magnitudes
# 0, 0.5, 1, 1.5, 2, 3, 4, 6, as compressed-tensors' cast_to_fp4 draws them:
# (boundary, whether the boundary itself rounds up).
FP4_STEPS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fp4_codes(a: torch.Tensor) -> torch.Tensor:
    """The FP4 magnitude code (0-7, uint8) of each |x| in `a`: the number of boundaries below it.
    The numba kernels write the same steps out by hand; their tests try every bfloat16 value."""
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for boundary, up in FP4_STEPS:
        code += a >= boundary if up else a > boundary
    return code


def fp4_values(y: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' cast_to_fp4 of y: the nearest FP4 value, ties to the even code."""
    code = fp4_codes(y.abs())
    magnitude = torch.tensor(FP4_MAGNITUDES, dtype=y.dtype, device=y.device)[code.long()]
    return torch.where(y < 0, -magnitude, magnitude)


def scheme_format(scheme) -> str:
    """The compressed-tensors format name that will compress `scheme` on a Linear layer."""
    from compressed_tensors.compressors.format import infer_module_format

    return scheme.format or infer_module_format(torch.nn.Linear, scheme).value
